"""examples/paper: the paper's Table 2 / Table 3 recipes plan (dry run) without loading models or data."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from metaxl import data as data_mod
from metaxl.cli import main
from metaxl.sweep import load_sweep, run_sweep

PAPER = REPO / "examples" / "paper"


@pytest.fixture
def no_loading(tmp_path, monkeypatch):
    """Any model load or data read fails the test; no data folder holds the paper's SA corpora."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dry run loaded a model or read data")

    import transformers

    for cls in ("AutoModel", "AutoModelForTokenClassification", "AutoModelForSequenceClassification", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", forbidden)
    monkeypatch.setattr(data_mod.Corpus, "load", forbidden)
    monkeypatch.setattr(data_mod, "read_conll", forbidden)
    monkeypatch.setattr(data_mod, "read_classification", forbidden)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # no hub access either
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("METAXL_DATA", raising=False)
    monkeypatch.setenv("METAXL_CACHE", str(tmp_path / "cache"))
    return cwd


def test_table2_dry_run_plans_72_runs(no_loading):
    out = io.StringIO()
    outcome = run_sweep(PAPER / "table2_ner.yaml", dry_run=True, out=out, progress=False)
    text = out.getvalue()
    assert outcome.total == 72 and outcome.exit_code == 0
    assert "warning" not in text  # WikiAnn comes from the hub: nothing to find locally
    for target in ("qu", "cdo", "ilo", "xmf", "mhr", "mi", "tk", "gn"):
        assert f"new        ner/wikiann-{target}/target-only/seed11" in text
    assert "ner/wikiann-qu/jt/src-wikiann-es/n5000/seed11" in text  # the paper's related source
    assert "ner/wikiann-tk/metaxl/src-wikiann-tr/n5000/L12/meta_lr-1e-07/seed11" in text
    assert not (no_loading / "runs").exists()


def test_table3_dry_run_plans_10_runs_and_says_where_the_data_goes(no_loading, tmp_path, monkeypatch, capsys):
    assert main(["sweep", str(PAPER / "table3_sa.yaml"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "10 runs" in text and "sa/sentipers/metaxl/src-marc-en/n1000/L12/meta_lr-3e-05/seed11" in text
    assert "warning: 2 data set(s)" in text and "write sentiraama/{train,dev,test}.jsonl" in text
    data = tmp_path / "corpora"
    for corpus in ("sentiraama", "sentipers"):
        (data / corpus).mkdir(parents=True)
        (data / corpus / "train.jsonl").write_text('{"text": "x", "label": "positive"}\n')
    monkeypatch.setenv("METAXL_DATA", str(data))
    assert main(["sweep", str(PAPER / "table3_sa.yaml"), "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert not (no_loading / "runs").exists()


@pytest.mark.parametrize("name", ["table2_ner.yaml", "table3_sa.yaml"])
def test_recipes_hold_the_papers_settings(name):
    spec = load_sweep(PAPER / name)
    base, grid = spec.base, spec.grid
    assert base["model"] == "xlm-roberta-base" and base["lr"] == 3.0e-5 and base["epochs"] == 20
    assert base["target_size"] == 100 and base["rtn_layers"] == [12]
    assert grid["meta_lr"] == [3.0e-5, 1.0e-6, 1.0e-7]
    if name.startswith("table2"):
        assert (base["batch_size"], base["max_length"], base["rtn_hidden"], grid["source_sizes"]) == (16, 200, 384, [5000])
    else:
        assert (base["batch_size"], base["max_length"], base["rtn_hidden"], grid["source_sizes"]) == (12, 256, 192, [1000])
    text = (PAPER / name).read_text()
    assert text.count("REF") >= 10  # settings traced to the reference notes
    assert yaml.safe_load(text)["name"].startswith("paper_")


def test_readme_documents_the_recipes():
    readme = (Path(REPO) / "README.md").read_text()
    assert "examples/paper/table2_ner.yaml" in readme and "examples/paper/table3_sa.yaml" in readme
