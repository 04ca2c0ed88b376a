"""The demo's data subsets shipped in the package (metaxl/demo_data) and the fallback to them."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import shared_data_or_skip

from metaxl import data as data_mod
from metaxl.data import resolve_dataset
from metaxl.demo import demo_args, demo_config
from metaxl.demo_subsets import DEMO_DATA_DIR, write_demo_subsets
from metaxl.errors import DataError
from metaxl.train import prepare_data


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
    """$METAXL_DATA is an empty folder, no ./data or ../shared/data, an empty download cache."""
    cwd = tmp_path / "clone" / "metaxl"
    cwd.mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("METAXL_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("METAXL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "_NOTICED", set())
    assert not any((p / "masakhaner2").exists() for p in data_mod.data_dirs())
    return tmp_path


@pytest.mark.parametrize("method", ["target-only", "jt", "metaxl"])
def test_demo_data_sets_load_on_a_fresh_machine(fresh_machine, method, capsys):
    data = prepare_data(demo_config(demo_args(), method))
    assert (len(data.target_train), len(data.dev), len(data.test)) == (100, 200, 500)
    assert [len(s) for s in data.sources] == ([] if method == "target-only" else [150])
    assert data.labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    notices = capsys.readouterr().err.strip().splitlines()
    expected = ["masakhaner2:luo"] + ([] if method == "target-only" else ["masakhaner2:en"])
    assert [line.split()[1] for line in notices] == expected  # one line per data set
    assert "demo subset shipped with metaxl" in notices[0] and "metaxl data download masakhaner2:luo" in notices[0]
    assert "100 train, 200 dev, 500 test sentences" in notices[0]


def test_notice_once_per_process_and_location(fresh_machine, capsys):
    first = resolve_dataset("masakhaner2:luo")
    again = resolve_dataset("masakhaner2:luo")
    assert first.location == again.location == str(DEMO_DATA_DIR / "masakhaner2" / "luo")
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_packaged_english_has_only_the_demo_split(fresh_machine):
    corpus = resolve_dataset("masakhaner2:en")
    assert len(corpus.load("train")) == 150
    with pytest.raises(DataError, match=r"has no dev split .*metaxl data download masakhaner2:en"):
        corpus.load("dev")


def test_a_data_folder_wins_over_the_packaged_subset(fresh_machine, capsys):
    luo = fresh_machine / "empty" / "masakhaner2" / "luo"
    luo.mkdir(parents=True)
    (luo / "train.txt").write_text("Kisumu B-LOC\n")
    corpus = resolve_dataset("masakhaner2:luo")
    assert corpus.location == str(luo) and len(corpus.load("train")) == 1
    assert capsys.readouterr().err == ""


def test_other_languages_are_not_packaged(fresh_machine):
    with pytest.raises(DataError, match=r"data set not found.*To get it: metaxl data download masakhaner2:wol"):
        resolve_dataset("masakhaner2:wol")


def test_packaged_data_is_small_and_licensed():
    files = [p for p in DEMO_DATA_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 400_000  # well under 1 MB
    licence = (DEMO_DATA_DIR / "LICENSE").read_text()
    assert "CC BY-NC 4.0" in licence and "masakhane-io/masakhane-ner" in licence
    assert "ba5843cd08aa491d5f96a5e809e71eb9ec461391" in licence


def test_packaged_subsets_are_the_demo_sample_of_the_full_corpus(tmp_path, monkeypatch):
    """The demo samples the same sentences, in the same order, from the full corpus and from the package."""
    shared = shared_data_or_skip("masakhaner2", "luo")
    full = prepare_data(demo_config(demo_args(["--data-dir", str(shared.parents[1])]), "jt"))
    monkeypatch.setattr(data_mod, "data_dirs", lambda data_dir=None: [tmp_path / "nothing"])
    packaged = prepare_data(demo_config(demo_args(), "jt"))
    assert packaged.target_train == full.target_train
    assert packaged.sources == full.sources
    assert (packaged.dev, packaged.test) == (full.dev, full.test)
    # and regenerating them gives the committed files, byte for byte
    counts = write_demo_subsets(shared.parents[1], tmp_path / "out")
    assert counts == {"masakhaner2/luo/train.txt": 100, "masakhaner2/luo/dev.txt": 200,
                      "masakhaner2/luo/test.txt": 500, "masakhaner2/en/train.txt": 150}
    for rel in counts:
        assert (tmp_path / "out" / rel).read_bytes() == (DEMO_DATA_DIR / rel).read_bytes(), rel


def test_pyproject_ships_every_demo_data_file():
    """Each file under demo_data matches a package-data pattern (a wheel would leave it out otherwise)."""
    import fnmatch
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["metaxl"]
    package = DEMO_DATA_DIR.parent
    for path in DEMO_DATA_DIR.rglob("*"):
        if path.is_file():
            rel = path.relative_to(package).as_posix()
            assert any(fnmatch.fnmatch(rel, pat) and rel.count("/") == pat.count("/") for pat in patterns), rel
