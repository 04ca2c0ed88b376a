"""`metaxl data`: counts per split, tokenizer coverage, examples, CLI output and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_data_or_skip

from metaxl.cli import main
from metaxl.data import NERExample, SAExample
from metaxl.datainfo import format_example, split_stats

NER_TRAIN = """Amina B-PER
Otieno I-PER
went O
to O
Kisumu B-LOC

ok O
ne O

unesco B-ORG
and O
safaricom B-ORG
€ O
"""


def write_ner(folder: Path, with_dev: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text(NER_TRAIN)
    if with_dev:
        (folder / "dev.txt").write_text("Lagos B-LOC\nok O\n")
    (folder / "test.txt").write_text("ok O\n")
    return folder


def test_counts_per_split() -> None:
    ner = [
        NERExample(("Amina", "Otieno", "went", "to", "Kisumu"), ("B-PER", "I-PER", "O", "O", "B-LOC")),
        NERExample(("ok", "ne"), ("O", "O")),
        NERExample(("unesco", "and", "safaricom", "€"), ("B-ORG", "O", "B-ORG", "O")),
    ]
    s = split_stats(ner, "toy", "train")
    assert (s.task, s.examples, s.words, s.mentions, s.with_entity) == ("ner", 3, 11, 4, 2)
    assert s.types == {"LOC": 1, "ORG": 2, "PER": 1}
    assert s.mentions_per_example == pytest.approx(4 / 3) and s.with_entity_share == pytest.approx(2 / 3)
    assert s.subwords is None and s.subwords_per_word is None
    sa = split_stats([SAExample("so very good", "positive"), SAExample("bad", "negative"),
                      SAExample("fine then", "positive")], "toy-sa")
    assert (sa.task, sa.examples, sa.words, sa.labels) == ("sa", 3, 6, {"negative": 1, "positive": 2})
    assert "mentions" not in sa.to_dict() and sa.to_dict()["words_per_example"] == 2.0


def test_tokenizer_coverage(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    # every word but "€" is in the tiny vocabulary as one piece; "kenya-airways" splits into 3; "€" is [UNK]
    s = split_stats([NERExample(("amina", "kenya-airways", "€"), ("B-PER", "B-ORG", "O"))], tokenizer=tok)
    assert (s.words, s.subwords, s.unknown) == (3, 5, 1)
    assert s.subwords_per_word == pytest.approx(5 / 3) and s.unknown_share == pytest.approx(1 / 5)
    sa = split_stats([SAExample("good kisumu", "positive")], tokenizer=tok)
    assert (sa.subwords, sa.unknown) == (2, 0)


def test_examples_bracket_entities() -> None:
    ex = NERExample(("rue", "Fontaine", "Paris", "x", "y"), ("B-LOC", "I-LOC", "B-LOC", "I-ORG", "O"))
    # adjacent spans stay apart; an I- tag of another type opens a span (IOB1-style input)
    assert format_example(ex) == "[rue Fontaine|LOC] [Paris|LOC] [x|ORG] y"
    s = split_stats([ex])  # counted as the same three spans
    assert (s.mentions, s.types) == (3, {"LOC": 2, "ORG": 1})


def test_cli_table_json_and_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = write_ner(tmp_path / "full")
    nodev = write_ner(tmp_path / "nodev", with_dev=False)
    assert main(["data", str(full), str(nodev), "--examples", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["data", "set", "split", "examples", "words/ex", "entities/ex", "with", "entity",
                                "entity", "types", "/", "labels"]
    train = next(ln for ln in lines if ln.startswith(str(full)) and " train " in ln).split()
    assert train[1:7] == ["train", "3", "3.7", "1.33", "66.7%", "ORG"]
    assert f"note: {nodev}: no dev split" in out and f"note: {full}" not in out
    assert f"{full} (train, 2 of 3, seed 1):" in out
    assert main(["data", str(nodev), "--splits", "dev,test", "--examples", "1"]) == 0
    assert f"{nodev} (test, 1 of 1, seed 0):\n  ok\n" in capsys.readouterr().out  # the first split read
    table = lines[: lines.index("")]
    assert [ln.split()[1] for ln in table if ln.startswith(str(nodev))] == ["train", "test"]

    assert main(["data", str(full), "--splits", "dev", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["splits"] == [
        {
            "name": str(full), "split": "dev", "task": "ner", "examples": 1, "words": 2, "mentions": 1,
            "with_entity": 1, "types": {"LOC": 1}, "subwords": None, "unknown": None, "words_per_example": 2.0,
            "mentions_per_example": 1.0, "with_entity_share": 1.0, "subwords_per_word": None, "unknown_share": None,
        }
    ]


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = write_ner(tmp_path / "full")
    assert main(["data", str(full), "--splits", "train,eval"]) == 2
    assert "--splits 'train,eval': use a comma list of train, dev, test" in capsys.readouterr().err
    assert main(["data", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "test.txt").write_text("ok O\n")
    nodev = write_ner(tmp_path / "nodev", with_dev=False)
    assert main(["data", str(nodev), str(tmp_path / "only"), "--splits", "train,dev"]) == 2
    err = capsys.readouterr().err  # names what "only" lacks, not what another data set lacks
    assert "only: none of the splits train, dev could be read" in err and f"{nodev}: no dev" not in err


def test_real_masakhaner_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    shared_data_or_skip("masakhaner2", "fr")
    assert main(["data", "masakhaner2:en", "masakhaner2:fr", "--splits", "train", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["splits"]}
    # sizes as the data README lists them; the French set has half the entity density of CoNLL English
    assert rows["masakhaner2:en"]["examples"] == 14041 and rows["masakhaner2:fr"]["examples"] == 9546
    assert rows["masakhaner2:en"]["mentions_per_example"] > 1.8 * rows["masakhaner2:fr"]["mentions_per_example"]
