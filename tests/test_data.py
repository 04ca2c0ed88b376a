"""Tests for metaxl.data: readers, data set resolution, subsampling, related languages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from metaxl.data import (
    RELATED_LANGUAGES,
    NERExample,
    SAExample,
    available_languages,
    marc_label,
    nusax_label,
    read_classification,
    read_conll,
    related_source,
    resolve_dataset,
    sentipers_label,
    subsample,
)
from metaxl.errors import ConfigError, DataError


def shared_data() -> Path:
    env = os.environ.get("METAXL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


DATA = shared_data()
needs_masakhaner = pytest.mark.skipif(
    not (DATA / "masakhaner2" / "luo").is_dir(), reason=f"MasakhaNER 2.0 not found under {DATA}"
)
needs_nusax = pytest.mark.skipif(
    not (DATA / "nusax-senti" / "balinese").is_dir(), reason=f"NusaX-Senti not found under {DATA}"
)


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A cwd without ./data or ../shared/data and no $METAXL_DATA."""
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("METAXL_DATA", raising=False)
    monkeypatch.setenv("METAXL_CACHE", str(tmp_path / "cache"))  # no corpora downloaded earlier
    return tmp_path


# ------------------------------------------------------------------ read_conll


def test_conll_plain_docstart_crlf_and_last_sentence(tmp_path):
    p = write(
        tmp_path / "train.txt",
        "-DOCSTART- O\n\nObama B-PER\nvisited O\nNairobi B-LOC\n\n\nKisumu B-LOC\ntown O",
        newline="\r\n",
    )
    assert read_conll(p) == [
        NERExample(("Obama", "visited", "Nairobi"), ("B-PER", "O", "B-LOC")),
        NERExample(("Kisumu", "town"), ("B-LOC", "O")),
    ]


def test_conll_2003_columns_and_tabs(tmp_path):
    p = write(tmp_path / "en.conll", "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter\tNNP\tB-NP\tB-PER\n")
    ex = read_conll(p)
    assert ex[0] == NERExample(("EU", "rejects"), ("B-ORG", "O"))
    assert ex[1] == NERExample(("Peter",), ("B-PER",))


def test_conll_keeps_non_ascii_spaces_inside_tokens(tmp_path):
    p = write(tmp_path / "t.txt", "Taranto\u00a0s B-ORG\nx O\n")
    assert read_conll(p)[0].tokens == ("Taranto\u00a0s", "x")


def test_rahimi_wikiann_prefix_stripped(tmp_path):
    p = write(tmp_path / "qu.txt", "qu:Lima\tB-LOC\nqu:llaqta\tO\n\nqu::\tO\nqu:Peru\tB-LOC\n")
    ex = read_conll(p)
    assert ex[0].tokens == ("Lima", "llaqta")
    assert ex[1].tokens == (":", "Peru")


def test_prefix_kept_when_not_shared_by_every_token(tmp_path):
    p = write(tmp_path / "t.txt", "re:Lima B-LOC\nqu:x O\n")
    assert read_conll(p)[0].tokens == ("re:Lima", "qu:x")
    p = write(tmp_path / "u.txt", "en:Lima B-LOC\nLima O\n")
    assert read_conll(p)[0].tokens == ("en:Lima", "Lima")


def test_iob1_and_bare_inside_converted_to_iob2(tmp_path):
    p = write(tmp_path / "t.txt", "a I-PER\nb I-PER\nc I-LOC\nd O\ne I-ORG\nf B-ORG\ng I-ORG\n")
    assert read_conll(p)[0].tags == ("B-PER", "I-PER", "B-LOC", "O", "B-ORG", "B-ORG", "I-ORG")


def test_malformed_line_names_file_and_line(tmp_path):
    p = write(tmp_path / "bad.txt", "Obama B-PER\n\nlonely\nx O\n")
    with pytest.raises(DataError) as e:
        read_conll(p)
    assert f"{p}:3" in str(e.value) and "lonely" in str(e.value)


def test_bioes_and_unknown_tags_rejected(tmp_path):
    p = write(tmp_path / "bioes.txt", "a O\nObama S-PER\n")
    with pytest.raises(DataError, match=r"bioes\.txt:2: .*BIOES"):
        read_conll(p)
    p = write(tmp_path / "weird.txt", "a O\n\nb PER\n")
    with pytest.raises(DataError, match=r"weird\.txt:3: tag 'PER'"):
        read_conll(p)


def test_empty_and_docstart_only_files_rejected(tmp_path):
    for text in ("", "\n\n", "-DOCSTART- -X- -X- O\n\n"):
        p = write(tmp_path / "e.txt", text)
        with pytest.raises(DataError, match="no sentences"):
            read_conll(p)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_conll(tmp_path / "nope.txt")
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"a O\n\nCaf\xe9 B-LOC\n")
    with pytest.raises(DataError, match=r"latin1\.txt:3: not valid UTF-8"):
        read_conll(p)


# ------------------------------------------------------------------ read_classification


def test_csv_with_quoted_commas_quotes_and_newlines(tmp_path):
    p = write(
        tmp_path / "train.csv",
        'id,text,label\n1,"Enak, murah, ""mantap""",positive\n2,"two\nlines",negative\n3,plain,neutral\n',
        newline="\r\n",
    )
    ex = read_classification(p)
    assert ex[0] == SAExample('Enak, murah, "mantap"', "positive")
    assert ex[1].text in ("two\nlines", "two\r\nlines")
    assert [e.label for e in ex] == ["positive", "negative", "neutral"]


def test_csv_wrong_column_count_names_line(tmp_path):
    p = write(tmp_path / "t.csv", "text,label\nfine,positive\nnot, quoted, positive\n")
    with pytest.raises(DataError, match=r"t\.csv:3: 3 columns"):
        read_classification(p)


def test_jsonl_tsv_and_json_array(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"sentence": "good", "sentiment": "pos"}\n\n{"sentence": "bad", "sentiment": "neg"}\n')
    assert read_classification(p) == [SAExample("good", "pos"), SAExample("bad", "neg")]
    p = write(tmp_path / "a.tsv", "Text\tLabel\ngood, very\tpos\n")
    assert read_classification(p) == [SAExample("good, very", "pos")]
    p = write(tmp_path / "a.json", '[{"content": "ok", "polarity": 1}]')
    assert read_classification(p) == [SAExample("ok", "1")]


def test_bad_jsonl_line(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", label\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: not a JSON object"):
        read_classification(p)


def test_field_detection_and_explicit_fields(tmp_path):
    p = write(tmp_path / "t.csv", "body,y\nhello,pos\n")
    with pytest.raises(DataError, match="text column among body, y"):
        read_classification(p)
    assert read_classification(p, text_field="body", label_field="y") == [SAExample("hello", "pos")]
    with pytest.raises(DataError, match="no label column 'z'"):
        read_classification(p, text_field="body", label_field="z")


def test_label_map_dict_drop_and_unknown(tmp_path):
    p = write(tmp_path / "t.csv", "text,label\na,1\nb,0\nc,2\n")
    assert read_classification(p, label_map={"1": "positive", "0": "negative", "2": None}) == [
        SAExample("a", "positive"), SAExample("b", "negative"),
    ]
    with pytest.raises(DataError, match=r"t\.csv:4: label '2'"):
        read_classification(p, label_map={"1": "positive", "0": "negative"})


def test_marc_stars_mapping(tmp_path):
    rows = "".join(f'{{"review_body": "r{s}", "stars": {s}}}\n' for s in (1, 2, 3, 4, 5))
    p = write(tmp_path / "marc.jsonl", rows)
    ex = read_classification(p, label_map=marc_label)
    assert [(e.text, e.label) for e in ex] == [
        ("r1", "negative"), ("r2", "negative"), ("r4", "positive"), ("r5", "positive"),
    ]
    p = write(tmp_path / "bad.jsonl", '{"review_body": "x", "stars": 7}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: label '7'"):
        read_classification(p, label_map=marc_label)


def test_label_schemes():
    assert [sentipers_label(p) for p in (-2, -1, 0, 1, 2)] == ["negative", "negative", None, "positive", "positive"]
    assert sentipers_label(0, "3way") == "neutral"
    assert marc_label("3", "3way") == "neutral" and marc_label(5, "all") == "5"
    assert nusax_label("neutral") is None and nusax_label("neutral", "all") == "neutral"
    with pytest.raises(ValueError):
        nusax_label("meh")


def test_all_rows_dropped_is_an_error(tmp_path):
    p = write(tmp_path / "t.csv", "text,label\na,neutral\n")
    with pytest.raises(DataError, match="no examples left"):
        read_classification(p, label_map=nusax_label)


# ------------------------------------------------------------------ resolve_dataset


def test_folder_corpus_ner_with_valid_alias(tmp_path):
    folder = tmp_path / "myner"
    write(folder / "train.txt", "a B-PER\n")
    write(folder / "valid.conll", "b B-LOC\n")
    write(folder / "test.iob", "c O\n")
    corpus = resolve_dataset(str(folder))
    assert corpus.task == "ner"
    assert corpus.load("dev") == [NERExample(("b",), ("B-LOC",))]
    assert corpus.load("validation") == corpus.load("dev")
    with pytest.raises(DataError, match="unknown split"):
        corpus.load("holdout")


def test_folder_corpus_sa_and_missing_split(tmp_path):
    folder = tmp_path / "mysa"
    write(folder / "train.jsonl", '{"text": "a", "label": "positive"}\n{"text": "b", "label": "neutral"}\n')
    corpus = resolve_dataset(str(folder))
    assert corpus.task == "sa"
    assert corpus.load("train") == [SAExample("a", "positive")]  # binary drops neutral
    assert len(resolve_dataset(str(folder), sa_labels="3way").load("train")) == 2
    with pytest.raises(DataError, match="no test file"):
        corpus.load("test")


def test_tsv_folder_follows_task(tmp_path):
    folder = tmp_path / "tsv"
    write(folder / "train.tsv", "text\tlabel\nnice\tpositive\n")
    assert resolve_dataset(str(folder), task="sa").load("train") == [SAExample("nice", "positive")]
    with pytest.raises(DataError):
        resolve_dataset(str(folder)).load("train")  # read as CoNLL: the header's tag 'label' is not IOB2


def test_single_file_serves_one_split(tmp_path):
    p = write(tmp_path / "some.txt", "a B-PER\n")
    corpus = resolve_dataset(str(p))
    assert corpus.load("test") == [NERExample(("a",), ("B-PER",))]
    assert corpus.load("test") == corpus.load("test")
    with pytest.raises(DataError, match="pass a folder"):
        corpus.load("train")


def test_task_conflicts_and_bad_values(tmp_path):
    p = write(tmp_path / "t.csv", "text,label\na,positive\n")
    with pytest.raises(DataError, match="task=ner"):
        resolve_dataset(str(p), task="ner")
    with pytest.raises(ConfigError):
        resolve_dataset(str(p), task="pos")
    with pytest.raises(ConfigError):
        resolve_dataset(str(p), sa_labels="5way")


def test_unknown_name(isolated):
    with pytest.raises(DataError, match="not a known name"):
        resolve_dataset("conll9999:xx")


def test_named_corpus_absent_lists_paths_and_how_to_get(isolated):
    empty = isolated / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        resolve_dataset("masakhaner2:wol", data_dir=empty)  # (luo and en have the demo's subsets in the package)
    msg = str(e.value)
    assert str(empty / "masakhaner2" / "wol") in msg
    assert str(Path.cwd() / "data" / "masakhaner2" / "wol") in msg
    assert str(isolated / "cache" / "data" / "masakhaner2" / "wol") in msg  # where downloads go
    assert f"metaxl data download masakhaner2:wol --data-dir {empty} (into {empty})" in msg
    assert "github.com/masakhane-io/masakhane-ner" in msg
    with pytest.raises(DataError, match=r"metaxl data download nusax:balinese .*github.com/IndoNLP/nusax"):
        resolve_dataset("nusax:balinese", data_dir=empty)


def test_absent_corpus_names_download_into_the_default_folder(isolated):
    with pytest.raises(DataError, match=r"To get it: metaxl data download nusax:balinese \(into .*cache/data\)"):
        resolve_dataset("nusax:ban")


def test_language_missing_here_but_downloadable(isolated, monkeypatch):
    data = isolated / "corpora"
    write(data / "masakhaner2" / "yy" / "train.txt", "b O\n")
    monkeypatch.setenv("METAXL_DATA", str(data))
    with pytest.raises(DataError, match=r"masakhaner2:wol: data set not found.*metaxl data download masakhaner2:wol"):
        resolve_dataset("masakhaner2:wol")


def test_named_local_layouts(isolated, monkeypatch):
    data = isolated / "corpora"
    write(data / "masakhaner2" / "xx" / "train.txt", "a B-PER\n")
    write(data / "masakhaner2" / "yy" / "train.txt", "b O\n")
    write(data / "nusax-senti" / "balinese" / "valid.csv", "id,text,label\n1,\"x, y\",neutral\n2,z,negative\n")
    monkeypatch.setenv("METAXL_DATA", str(data))  # found through the environment variable
    corpus = resolve_dataset("masakhaner2:XX")
    assert corpus.name == "masakhaner2:xx" and corpus.task == "ner"
    assert corpus.load("train") == [NERExample(("a",), ("B-PER",))]
    with pytest.raises(DataError, match="available: xx, yy"):
        resolve_dataset("masakhaner2:zz")
    nusax = resolve_dataset("nusax-senti:ban")
    assert nusax.name == "nusax:balinese" and nusax.task == "sa"
    assert nusax.load("dev") == [SAExample("z", "negative")]
    assert len(resolve_dataset("nusax:balinese", sa_labels="3way").load("dev")) == 2
    assert available_languages("masakhaner2") == ["xx", "yy"]
    with pytest.raises(ConfigError, match="sentiment"):
        resolve_dataset("nusax:balinese", task="ner")


def test_hub_corpus_without_datasets_package(isolated, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    corpus = resolve_dataset("wikiann:qu")  # resolving does not touch the hub
    assert corpus.task == "ner"
    with pytest.raises(DataError) as e:
        corpus.load("train")
    assert "pip install datasets" in str(e.value) and "wikiann/qu" in str(e.value)
    with pytest.raises(DataError, match="pip install datasets"):
        resolve_dataset("marc:en").load("test")


def test_hub_names_use_local_folders_first(isolated):
    data = isolated / "corpora"
    write(data / "wikiann" / "qu" / "train.txt", "qu:Lima\tB-LOC\n")
    write(data / "marc" / "en" / "train.jsonl", '{"review_body": "bad", "stars": 1}\n{"review_body": "so so", "stars": 3}\n')
    write(data / "sentipers" / "train.csv", "text,polarity\nخوب,2\nمعمولی,0\n")
    assert resolve_dataset("wikiann:qu", data).load("train") == [NERExample(("Lima",), ("B-LOC",))]
    assert resolve_dataset("marc:en", data).load("train") == [SAExample("bad", "negative")]
    assert len(resolve_dataset("marc:en", data, sa_labels="3way").load("train")) == 2
    assert resolve_dataset("sentipers", data).load("train") == [SAExample("خوب", "positive")]
    with pytest.raises(DataError, match="get Sentiraama"):
        resolve_dataset("sentiraama", data).load("train")


# ------------------------------------------------------------------ subsample


def test_subsample_deterministic_and_ordered():
    items = list(range(100))
    a = subsample(items, 10, seed=42)
    assert a == subsample(items, 10, seed=42)
    assert a == sorted(a) and len(set(a)) == 10
    assert a != subsample(items, 10, seed=43)
    assert subsample(items, None, seed=1) == items
    assert subsample(items, 1000, seed=1) == items
    assert subsample(items, 0, seed=1) == []
    with pytest.raises(ConfigError):
        subsample(items, -1, seed=1)


# ------------------------------------------------------------------ related languages


MASAKHANER_SOURCES = set("ar da de en es fa fi fr hu id it lv ne nl no pt ro sv uk".split())
MASAKHANER_AFRICAN = set(
    "am bam bbj ewe fon hau ibo kin lug luo mos nya pcm sna swa tsn twi wol xho yor zul".split()
)


def test_related_sources():
    assert related_source("wikiann:qu")[0] == "wikiann:es"
    assert related_source("WIKIANN:tk")[0] == "wikiann:tr"
    assert related_source("nusax-senti:bug")[0] == "nusax:indonesian"
    for target in MASAKHANER_AFRICAN:
        source, reason = related_source(f"masakhaner2:{target}")
        lang = source.split(":")[1]
        assert lang != target and lang in MASAKHANER_SOURCES | MASAKHANER_AFRICAN and reason
    assert len(RELATED_LANGUAGES) >= 8 + 10 + 21
    with pytest.raises(DataError, match="pass --source"):
        related_source("masakhaner2:en")


# ------------------------------------------------------------------ real data (skipped when absent)


@needs_masakhaner
def test_real_masakhaner2_luo_counts():
    corpus = resolve_dataset("masakhaner2:luo", DATA)
    assert [len(corpus.load(s)) for s in ("train", "dev", "test")] == [5161, 737, 1474]
    train = corpus.load("train")
    assert all(len(ex.tokens) == len(ex.tags) > 0 for ex in train)
    assert {t for ex in train for t in ex.tags} == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"}
    assert "luo" in available_languages("masakhaner2", DATA)


@needs_masakhaner
def test_real_related_sources_exist():
    for key, (source, _) in RELATED_LANGUAGES.items():
        if key.startswith("masakhaner2:"):
            assert (DATA / "masakhaner2" / source.split(":")[1]).is_dir(), source


@needs_nusax
def test_real_nusax_balinese_binary_drops_neutral():
    binary = resolve_dataset("nusax:balinese", DATA)
    full = resolve_dataset("nusax:balinese", DATA, sa_labels="3way")
    train_b, train_3 = binary.load("train"), full.load("train")
    assert {e.label for e in train_b} == {"negative", "positive"}
    assert {e.label for e in train_3} == {"negative", "neutral", "positive"}
    assert len(train_b) == len(train_3) - sum(e.label == "neutral" for e in train_3)
    assert len(full.load("dev")) == 100 and len(full.load("test")) == 400
    assert any("," in e.text for e in train_3)  # quoted commas survive
