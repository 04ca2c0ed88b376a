"""How far apart are source and target representations? (paper section 4.5, Figures 1 and 3)

* :func:`hausdorff_cosine` / :func:`directed_hausdorff_cosine` -- Hausdorff distance between two
  sets of vectors under the cosine distance ``d(s, t) = 1 - cos(s, t)``, computed in blocks so
  that 10k x 10k sets of 768-d vectors never materialise the full distance matrix.
* :func:`collect_representations` -- the vectors of a HF encoder at one layer: the first token
  ([CLS] / <s>) per sentence for sentiment analysis, the first sub-word of every word for NER.
* :func:`pca_2d` / :func:`plot_pca` -- one 2-component PCA per model, source vs target scatter.
* :func:`analyze_checkpoints` -- all of the above for trained checkpoints (``metaxl analyze``),
  writing ``hausdorff.json`` and ``pca.png``.

>>> import torch
>>> from metaxl.analysis import hausdorff_cosine
>>> a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
>>> round(hausdorff_cosine(a, a), 6)
0.0
>>> v = torch.tensor([[1.0, 2.0], [3.0, 6.0]])   # one direction, two lengths
>>> round(hausdorff_cosine(v, -v), 6)
2.0
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    import argparse

ArrayLike = torch.Tensor | np.ndarray
"""A [n, d] set of vectors: a torch tensor or a numpy array."""

_EPS = 1e-12

__all__ = [
    "HausdorffResult",
    "hausdorff_cosine",
    "directed_hausdorff_cosine",
    "hausdorff_cosine_both",
    "collect_representations",
    "pca_2d",
    "plot_pca",
    "analyze_checkpoints",
    "register_cli",
]


# ----------------------------------------------------------------------------------------------
# Hausdorff distance
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HausdorffResult:
    """Both directed distances and their maximum (the symmetric Hausdorff distance).

    ``a_to_b = max_{x in A} min_{y in B} d(x, y)`` and ``b_to_a`` the other way round.
    """

    hausdorff: float
    a_to_b: float
    b_to_a: float


def _as_matrix(x: ArrayLike, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise DataError(
            f"{name}: expected a torch tensor or numpy array of shape [n, d], got {type(x).__name__}"
        )
    if t.dim() != 2:
        raise DataError(f"{name}: expected a 2-d [n, d] set of vectors, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise DataError(f"{name}: the set of vectors is empty; pass at least one vector")
    t = t.to(device=device, dtype=dtype)
    if not torch.isfinite(t).all():
        raise DataError(f"{name}: contains NaN or infinite values; check the model outputs")
    return t


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    # Zero vectors stay zero: their cosine with anything is 0, i.e. distance 1.
    return t / t.norm(dim=1, keepdim=True).clamp_min(_EPS)


def hausdorff_cosine_both(
    a: ArrayLike,
    b: ArrayLike,
    block_size: int = 4096,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
) -> HausdorffResult:
    """Symmetric and both directed cosine Hausdorff distances in one blocked pass.

    The distance matrix is never built: blocks of ``block_size x block_size`` cosine similarities
    update a running row-maximum (for ``a``) and column-maximum (for ``b``); memory is
    ``O((n + m) * d + block_size**2)``. ``dtype`` is the accumulation type (``torch.float64``,
    the default, is exact to ~1e-12; ``torch.float32`` is about twice as fast). ``device``
    defaults to ``a``'s device for tensors, else CPU. A zero vector has cosine 0 with everything
    (distance 1). Values lie in [0, 2].

    >>> import numpy as np
    >>> r = hausdorff_cosine_both(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    >>> (round(r.hausdorff, 6), round(r.a_to_b, 6), round(r.b_to_a, 6))
    (1.0, 0.0, 1.0)
    """
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    if device is None:
        device = a.device if isinstance(a, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    ua = _unit_rows(_as_matrix(a, "a", dtype, device))
    ub = _unit_rows(_as_matrix(b, "b", dtype, device))
    if ua.shape[1] != ub.shape[1]:
        raise DataError(
            f"the two sets have different dimensions ({ua.shape[1]} vs {ub.shape[1]}); "
            "take both from the same model and layer"
        )
    n, m = ua.shape[0], ub.shape[0]
    # col_max[j] = max_i cos(a_i, b_j); row-max is reduced per a-block straight away.
    col_max = torch.full((m,), -math.inf, dtype=dtype, device=device)
    min_row_max = math.inf  # min over a of (max over b of cos) -> a_to_b = 1 - this
    with torch.no_grad():
        for i in range(0, n, block_size):
            a_blk = ua[i : i + block_size]
            row_max = torch.full((a_blk.shape[0],), -math.inf, dtype=dtype, device=device)
            for j in range(0, m, block_size):
                sim = a_blk @ ub[j : j + block_size].T
                torch.maximum(row_max, sim.amax(dim=1), out=row_max)
                col_blk = col_max[j : j + block_size]
                torch.maximum(col_blk, sim.amax(dim=0), out=col_blk)
                del sim
            min_row_max = min(min_row_max, float(row_max.min()))
        min_col_max = float(col_max.min())
    a_to_b = min(max(1.0 - min_row_max, 0.0), 2.0)
    b_to_a = min(max(1.0 - min_col_max, 0.0), 2.0)
    return HausdorffResult(hausdorff=max(a_to_b, b_to_a), a_to_b=a_to_b, b_to_a=b_to_a)


def hausdorff_cosine(
    a: ArrayLike,
    b: ArrayLike,
    block_size: int = 4096,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
) -> float:
    """Hausdorff distance ``max(h(A, B), h(B, A))`` with cosine distance ``1 - cos``.

    ``a`` is [n, d], ``b`` is [m, d] (torch or numpy). See :func:`hausdorff_cosine_both` for the
    blocking, precision and zero-vector conventions.

    >>> import torch
    >>> a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    >>> b = torch.tensor([[1.0, 0.0]])
    >>> round(hausdorff_cosine(a, b), 4)   # 1 - cos(45 degrees)
    0.2929
    """
    return hausdorff_cosine_both(a, b, block_size, dtype=dtype, device=device).hausdorff


def directed_hausdorff_cosine(
    a: ArrayLike,
    b: ArrayLike,
    block_size: int = 4096,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
) -> float:
    """Directed distance ``h(A, B) = max_{a in A} min_{b in B} (1 - cos(a, b))`` (not symmetric).

    >>> import torch
    >>> a = torch.tensor([[1.0, 0.0]])
    >>> b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> directed_hausdorff_cosine(a, b), directed_hausdorff_cosine(b, a)
    (0.0, 1.0)
    """
    return hausdorff_cosine_both(a, b, block_size, dtype=dtype, device=device).a_to_b


# ----------------------------------------------------------------------------------------------
# Representations
# ----------------------------------------------------------------------------------------------
def _num_layers(model: Any) -> int:
    cfg = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    raise ModelError(f"cannot tell how many layers {type(model).__name__} has (no config.num_hidden_layers)")


def resolve_layer(model: Any, layer: int | None) -> int:
    """Turn ``layer`` into an index of ``hidden_states`` (0 = embeddings, N = last layer).

    ``None`` and ``-1`` mean the last layer; other negative values count from the end.

    >>> from transformers import BertConfig, BertModel
    >>> m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                          intermediate_size=37, vocab_size=20))
    >>> resolve_layer(m, None), resolve_layer(m, 0), resolve_layer(m, -1)
    (2, 0, 2)
    """
    n = _num_layers(model)
    if layer is None:
        return n
    resolved = layer + n + 1 if layer < 0 else layer
    if not 0 <= resolved <= n:
        raise ConfigError(
            f"layer {layer} is out of range for a {n}-layer model; use 0 (embeddings) to {n} (last), or -1"
        )
    return resolved


def _as_inputs(task: str, items: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    if task == "ner":
        for k, it in enumerate(items):
            words = getattr(it, "tokens", it)
            if isinstance(words, str) or not isinstance(words, Sequence):
                raise DataError(
                    f"NER input {k}: expected a list of words (or an NERExample), got {type(it).__name__}"
                )
            out.append([str(w) for w in words])
    elif task == "sa":
        for k, it in enumerate(items):
            text = getattr(it, "text", it)
            if not isinstance(text, str):
                raise DataError(f"SA input {k}: expected a string (or an SAExample), got {type(it).__name__}")
            out.append(text)
    else:
        raise ConfigError(f"task must be 'ner' or 'sa', got {task!r}")
    return out


def collect_representations(
    model: Any,
    tokenizer: Any,
    task: str,
    texts_or_examples: Sequence[Any],
    layer: int | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    device: str | torch.device | None = None,
    max_vectors: int | None = None,
    seed: int = 0,
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> torch.Tensor:
    """Vectors of ``model`` at ``layer`` (``hidden_states[layer]``, 0 = embeddings, None = last).

    * ``task="ner"``: inputs are word lists (``NERExample.tokens`` or ``list[list[str]]``); one
      vector per word, at its first sub-word. Special and pad tokens are skipped; words cut off by
      ``max_length`` are dropped.
    * ``task="sa"``: inputs are strings (``SAExample.text`` or ``str``); one vector per sentence,
      at the first real token ([CLS] / <s>; left padding is handled).

    ``model`` is any HF ``*ForTokenClassification`` / ``*ForSequenceClassification`` or base
    encoder; it runs in eval mode under ``torch.no_grad`` (its train/eval mode is restored after).
    ``device`` moves the model there (None: leave it where it is). ``transform`` (e.g. a trained
    RTN, token-wise) is applied to the hidden states of ``layer`` before gathering.
    ``max_vectors`` keeps a deterministic (``seed``) random subset, in the original order.
    Batches are formed from length-sorted inputs (less padding); the vectors come back in the
    order of the inputs.
    Returns a float32 CPU tensor ``[n_vectors, hidden_size]``.

    >>> vecs = collect_representations(model, tok, "ner", [["Kampala", "is", "big"]])  # doctest: +SKIP
    >>> vecs.shape                                                                       # doctest: +SKIP
    torch.Size([3, 768])
    """
    inputs = _as_inputs(task, texts_or_examples)
    _check_collect_args(task, tokenizer, batch_size, max_vectors)
    index = resolve_layer(model, layer)
    if device is not None:
        model.to(device)
    try:
        run_device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        run_device = torch.device("cpu")
    from tqdm.auto import tqdm

    encoded, row_of, order = _tokenize_once(tokenizer, task, inputs, max_length)
    per_input: dict[int, torch.Tensor] = {}
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc=desc or f"encoding ({task})", disable=not progress, leave=False):
                idx = order[start : start + batch_size]
                rows = [row_of[i] for i in idx]
                enc, shifts = _pad_rows(tokenizer, encoded, rows)
                hidden = _layer_states(model, {k: v.to(run_device) for k, v in enc.items()}, index, transform)
                if task == "ner":
                    per_input.update(_word_vectors(hidden, encoded, idx, rows, shifts))
                else:
                    per_input.update(_sentence_vectors(hidden, enc["attention_mask"], idx))
    finally:
        model.train(was_training)

    chunks = [per_input[i] for i in sorted(per_input)]
    hidden_size = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    vectors = torch.cat(chunks) if chunks else torch.zeros(0, hidden_size)
    if max_vectors is not None and vectors.shape[0] > max_vectors:
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(vectors.shape[0], generator=gen)[:max_vectors].sort().values
        vectors = vectors[keep]
    return vectors


def _tokenize_once(tokenizer: Any, task: str, inputs: list[Any], max_length: int
                   ) -> tuple[Any, dict[int, int], list[int]]:
    """The inputs tokenized once, unpadded (each batch is padded to its own longest row), the row of
    each input in that encoding, and the inputs in order of length (batches of similar lengths pad
    less; the vectors go back to the given order). Empty word lists are left out: they have no
    vectors (and the tokenizer may reject them)."""
    keep_idx = [i for i, x in enumerate(inputs) if not (task == "ner" and not x)]
    encoded = tokenizer(
        [inputs[i] for i in keep_idx], is_split_into_words=(task == "ner"), truncation=True,
        max_length=max_length, return_attention_mask=True,
    ) if keep_idx else None
    row_of = {i: j for j, i in enumerate(keep_idx)}
    order = sorted(keep_idx, key=lambda i: len(encoded["input_ids"][row_of[i]]))  # type: ignore[index]
    return encoded, row_of, order


def _layer_states(model: Any, feed: dict[str, torch.Tensor], index: int,
                  transform: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """``hidden_states[index]`` of ``model`` on a batch, through ``transform`` if given."""
    out = model(**feed, output_hidden_states=True, return_dict=True)
    hidden_states = getattr(out, "hidden_states", None)
    if hidden_states is None:
        raise ModelError(f"{type(model).__name__} did not return hidden_states")
    hidden = hidden_states[index]
    return transform(hidden) if transform is not None else hidden


def _check_collect_args(task: str, tokenizer: Any, batch_size: int, max_vectors: int | None) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if max_vectors is not None and max_vectors < 1:
        raise ConfigError(f"max_vectors must be >= 1 (or None for all), got {max_vectors}")
    if task == "ner" and not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            "NER analysis needs a fast (Rust) tokenizer for word_ids(); load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def _word_vectors(hidden: torch.Tensor, encoded: Any, idx: Sequence[int], rows: Sequence[int],
                  shifts: Sequence[int]) -> dict[int, torch.Tensor]:
    """NER: per input, the vectors of its words' first sub-words (inputs whose words were all cut
    off by ``max_length`` have none)."""
    out: dict[int, torch.Tensor] = {}
    for b, i in enumerate(idx):
        previous, cols = None, []
        for pos, wid in enumerate(encoded.word_ids(rows[b])):
            if wid is not None and wid != previous:
                cols.append(pos + shifts[b])
            previous = wid
        if cols:
            out[i] = hidden[b, torch.tensor(cols, device=hidden.device)].float().cpu()
    return out


def _sentence_vectors(hidden: torch.Tensor, attention_mask: torch.Tensor, idx: Sequence[int]
                      ) -> dict[int, torch.Tensor]:
    """SA: per input, the vector of its first real token ([CLS] / <s>), also with left padding."""
    first = attention_mask.to(hidden.device).argmax(dim=1)
    firsts = hidden[torch.arange(hidden.shape[0], device=hidden.device), first].float().cpu()
    return {i: firsts[b : b + 1] for b, i in enumerate(idx)}


def _pad_rows(tokenizer: Any, encoded: Any, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Rows ``rows`` of an unpadded encoding as padded tensors, on the tokenizer's padding side.

    Returns the model inputs (input_ids, attention_mask and, when the tokenizer makes them,
    token_type_ids) and, per row, how far its tokens moved right (its left padding).
    """
    left = getattr(tokenizer, "padding_side", "right") == "left"
    pad_values = {
        "input_ids": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        "attention_mask": 0,
        "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0,
    }
    width = max(len(encoded["input_ids"][r]) for r in rows)
    shifts = [width - len(encoded["input_ids"][r]) if left else 0 for r in rows]
    out: dict[str, torch.Tensor] = {}
    for key, value in pad_values.items():
        if key not in encoded:
            continue
        padded = []
        for r in rows:
            seq = list(encoded[key][r])
            fill = [value] * (width - len(seq))
            padded.append(fill + seq if left else seq + fill)
        out[key] = torch.tensor(padded, dtype=torch.long)
    return out, shifts


# ----------------------------------------------------------------------------------------------
# PCA and plots
# ----------------------------------------------------------------------------------------------
def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def pca_2d(arrays: Sequence[ArrayLike]) -> list[np.ndarray]:
    """Project several [n_i, d] sets with ONE 2-component PCA fitted on their union.

    Plain numpy (eigen-decomposition of the d x d covariance); deterministic signs (the largest
    loading of each component is positive). Returns one [n_i, 2] array per input; if the data has
    fewer than 2 dimensions the missing coordinates are 0.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> src, tgt = pca_2d([rng.normal(size=(50, 8)), rng.normal(size=(30, 8)) + 3])
    >>> src.shape, tgt.shape
    ((50, 2), (30, 2))
    """
    mats = [_to_numpy(a) for a in arrays]
    if not mats:
        return []
    for k, a in enumerate(mats):
        if a.ndim != 2:
            raise DataError(f"pca_2d: array {k} must be 2-d [n, d], got shape {a.shape}")
    dims = {a.shape[1] for a in mats}
    if len(dims) != 1:
        raise DataError(f"pca_2d: arrays have different dimensions {sorted(dims)}")
    union = np.concatenate(mats, axis=0)
    if union.shape[0] == 0:
        return [np.zeros((0, 2)) for _ in mats]
    mean = union.mean(axis=0)
    centred = union - mean
    cov = centred.T @ centred / max(union.shape[0] - 1, 1)
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    comps = vecs[:, ::-1][:, :2]
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(comps.shape[1])])
    comps = comps * np.where(signs == 0, 1.0, signs)
    if comps.shape[1] < 2:
        comps = np.pad(comps, ((0, 0), (0, 2 - comps.shape[1])))
    return [(a - mean) @ comps for a in mats]


Panel = tuple[str, ArrayLike, ArrayLike] | tuple[str, ArrayLike, ArrayLike, float]
"""``(name, source_vectors, target_vectors)`` or with a precomputed Hausdorff distance appended."""


def _subsample_rows(x: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    if n is None or x.shape[0] <= n:
        return x
    keep = np.sort(np.random.default_rng(seed).permutation(x.shape[0])[:n])
    return x[keep]


def plot_pca(
    panels: Sequence[Panel],
    path: str | Path,
    source_name: str,
    target_name: str,
    title: str | None = None,
    *,
    max_points: int | None = 4000,
    seed: int = 0,
) -> Path:
    """Write a PNG with one PCA scatter per model: source vs target, Hausdorff distance in the title.

    Each panel is ``(name, source_vecs, target_vecs)`` or ``(name, source_vecs, target_vecs,
    hausdorff)``; without the fourth element the distance is computed here on all vectors. Each
    panel gets its own PCA (fitted on its source + target vectors), since different models live in
    different spaces. At most ``max_points`` per set are drawn (deterministic subset).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> p = plot_pca([("JT", rng.normal(size=(200, 16)), rng.normal(size=(100, 16)) + 1)],
    ...              "/tmp/pca.png", "English", "Quechua")
    >>> p.stat().st_size > 0
    True
    """
    if not panels:
        raise ConfigError("plot_pca: give at least one (name, source_vectors, target_vectors) panel")
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; a no-op if a backend is already set
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = len(panels)
    cols = min(k, 3)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.6 * cols, 4.6 * rows + (0.4 if title else 0)), squeeze=False
    )
    try:
        for ax, panel in zip(axes.flat, panels, strict=False):
            _draw_panel(ax, panel, source_name, target_name, max_points, seed)
        for ax in list(axes.flat)[k:]:
            ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=12)
        fig.tight_layout()
        fig.savefig(path, dpi=130)
    finally:
        plt.close(fig)
    return path


_COLOURS = {"source": "#1f77b4", "target": "#d62728"}


def _draw_panel(ax: Any, panel: Panel, source_name: str, target_name: str, max_points: int | None, seed: int
                ) -> None:
    """One model's PCA scatter (source and target points), its Hausdorff distance in the title."""
    name, src, tgt = panel[0], panel[1], panel[2]
    h = float(panel[3]) if len(panel) > 3 else hausdorff_cosine(src, tgt)  # type: ignore[misc]
    src_np, tgt_np = _to_numpy(src), _to_numpy(tgt)
    s2, t2 = pca_2d(
        [_subsample_rows(src_np, max_points, seed), _subsample_rows(tgt_np, max_points, seed + 1)]
    )
    size = 6 if max(len(s2), len(t2)) > 500 else 14
    alpha = 0.35 if max(len(s2), len(t2)) > 500 else 0.6
    for role, xy, n_all, label in (
        ("source", s2, len(src_np), source_name),
        ("target", t2, len(tgt_np), target_name),
    ):
        shown = f", {len(xy)} shown" if len(xy) < n_all else ""
        ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=alpha, c=_COLOURS[role], marker="o",
                   linewidths=0, label=f"{label} ({role}, n={n_all}{shown})", rasterized=True)  # fmt: skip
    ax.set_title(f"{name}\nHausdorff = {h:.3f}", fontsize=11)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("PC 1", fontsize=9)
    ax.set_ylabel("PC 2", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, linewidth=0.4, alpha=0.4)
    leg = ax.legend(loc="best", fontsize=8, markerscale=2.5, framealpha=0.85)
    for handle in leg.legend_handles:
        if handle is not None:
            handle.set_alpha(1.0)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
_METHOD_NAMES = {"target-only": "Target only", "jt": "JT", "jt-rtn": "JT+RTN", "metaxl": "MetaXL"}


def _default_name(path: str, meta: dict[str, Any]) -> str:
    config = meta.get("config") if isinstance(meta, dict) else None
    method = config.get("method") if isinstance(config, dict) else None
    if isinstance(method, str) and method:
        return _METHOD_NAMES.get(method, method)
    p = Path(path).resolve()
    return p.parent.name if p.name == "checkpoint" else p.name


def _folder_label(path: str) -> str:
    p = Path(path).resolve()
    return p.parent.name if p.name == "checkpoint" else p.name


def analyze_checkpoints(
    checkpoints: Sequence[str],
    source_spec: str,
    target_spec: str,
    *,
    split: str = "test",
    layer: int | None = None,
    n_examples: int | None = 500,
    data_dir: str | None = None,
    out_dir: str | Path = "analysis",
    labels_for_panels: Sequence[str] | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    max_vectors: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Hausdorff distance and PCA plot of source vs target representations for trained checkpoints.

    For each checkpoint (``metaxl.checkpoint.load_checkpoint``) the ``split`` of both data sets
    (first ``n_examples`` of a deterministic ``seed`` sample, ``None``: all) is encoded at
    ``layer`` (None: last). Writes ``out_dir/hausdorff.json`` and ``out_dir/pca.png`` (one panel
    per checkpoint) and returns the JSON dict: ``{"source", "target", "split", "task",
    "checkpoints": [{"name", "path", "layer", "n_source", "n_target", "hausdorff",
    "source_to_target", "target_to_source"}], "json", "png"}``.

    >>> analyze_checkpoints(["runs/jt/checkpoint", "runs/metaxl/checkpoint"],
    ...                     "masakhaner2:en", "masakhaner2:luo", out_dir="analysis")  # doctest: +SKIP
    """
    from .data import resolve_dataset, subsample

    _check_analysis_args(checkpoints, labels_for_panels, n_examples)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    data_cache: dict[tuple[str, str, str], list[Any]] = {}

    def examples(spec: str, ckpt: _Analysed) -> list[Any]:
        key = (spec, ckpt.task, ckpt.sa_labels)
        if key not in data_cache:
            corpus = resolve_dataset(spec, data_dir, task=ckpt.task, sa_labels=ckpt.sa_labels)
            loaded = corpus.load(split)
            if not loaded:
                raise DataError(f"{spec}: the {split!r} split is empty; choose another with --split")
            data_cache[key] = list(subsample(loaded, n_examples, seed))
        return data_cache[key]

    records: list[dict[str, Any]] = []
    panels: list[Panel] = []
    task_seen: str | None = None
    for k, ckpt in enumerate(checkpoints):
        loaded = _load_for_analysis(ckpt, device, task_seen)
        task_seen = loaded.task
        name = labels_for_panels[k] if labels_for_panels is not None else _default_name(ckpt, loaded.meta)
        record, vecs = _compare(loaded, name, ckpt, layer, {"source": source_spec, "target": target_spec},
                                examples, split,
                                batch_size=batch_size, max_vectors=max_vectors, seed=seed, progress=progress)
        records.append(record)
        panels.append((name, vecs["source"].numpy(), vecs["target"].numpy(), record["hausdorff"]))
        del loaded, vecs
    if labels_for_panels is None:
        _distinguish_names(records, panels)
    return _write_analysis(out, records, panels, source_spec, target_spec, split, task_seen, n_examples)


def _check_analysis_args(checkpoints: Sequence[str], labels_for_panels: Sequence[str] | None,
                         n_examples: int | None) -> None:
    if not checkpoints:
        raise ConfigError("give at least one checkpoint folder to analyse")
    if labels_for_panels is not None and len(labels_for_panels) != len(checkpoints):
        raise ConfigError(
            f"{len(labels_for_panels)} panel name(s) for {len(checkpoints)} checkpoint(s); "
            "give exactly one name per checkpoint (--names JT,MetaXL)"
        )
    if n_examples is not None and n_examples < 1:
        raise ConfigError(f"n_examples must be >= 1 (or None for all), got {n_examples}")


@dataclass
class _Analysed:
    """A loaded checkpoint with what its analysis needs from its record."""

    model: Any
    tokenizer: Any
    task: str
    meta: dict[str, Any]
    sa_labels: str
    max_length: int


def _load_for_analysis(ckpt: str, device: str, task_seen: str | None) -> _Analysed:
    """The checkpoint, its task (the same as the checkpoints before it), its SA label set and the
    max_length it was trained with."""
    from .checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt, device)
    task = loaded.task
    if task_seen is not None and task != task_seen:
        raise ConfigError(
            f"{ckpt} is a {task!r} model but the previous checkpoint(s) are {task_seen!r}; "
            "analyse checkpoints of one task together"
        )
    meta = loaded.meta if isinstance(loaded.meta, dict) else {}
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    sa_labels = str(config.get("sa_labels", "binary")) if config else "binary"
    max_length = int(
        getattr(loaded, "max_length", None)
        or meta.get("max_length")
        or (config or {}).get("max_length")
        or 128
    )
    return _Analysed(loaded.model, loaded.tokenizer, task, meta, sa_labels, max_length)


def _compare(loaded: _Analysed, name: str, ckpt: str, layer: int | None, specs: dict[str, str],
             examples: Callable[[str, _Analysed], list[Any]], split: str, **collect: Any
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One checkpoint's record (Hausdorff distances, sizes) and its source and target vectors."""
    resolved_layer = resolve_layer(loaded.model, layer)
    vecs = {}
    for role, spec in specs.items():
        vecs[role] = collect_representations(
            loaded.model, loaded.tokenizer, loaded.task, examples(spec, loaded), resolved_layer,
            max_length=loaded.max_length, desc=f"{name}: {role} {spec}", **collect,
        )
        if vecs[role].shape[0] == 0:
            raise DataError(f"{spec} ({split}): no vectors were produced; is the split empty?")
    res = hausdorff_cosine_both(vecs["source"], vecs["target"])
    record = {
        "name": name,
        "path": str(ckpt),
        "task": loaded.task,
        "layer": resolved_layer,
        "n_source": int(vecs["source"].shape[0]),
        "n_target": int(vecs["target"].shape[0]),
        "hausdorff": res.hausdorff,
        "source_to_target": res.a_to_b,
        "target_to_source": res.b_to_a,
    }
    return record, vecs


def _write_analysis(out: Path, records: list[dict[str, Any]], panels: list[Panel], source_spec: str,
                    target_spec: str, split: str, task: str | None, n_examples: int | None) -> dict[str, Any]:
    """``pca.png`` (one panel per checkpoint) and ``hausdorff.json``; returns the JSON dict."""
    json_path = out / "hausdorff.json"
    png_path = out / "pca.png"
    layers = sorted({r["layer"] for r in records})
    what = "sentence ([CLS]) vectors" if task == "sa" else "token vectors"
    plot_pca(
        panels,
        png_path,
        source_spec,
        target_spec,
        title=f"{source_spec} vs {target_spec} ({split}), {what}, layer {', '.join(map(str, layers))}",
    )
    result: dict[str, Any] = {
        "source": source_spec,
        "target": target_spec,
        "split": split,
        "task": task,
        "n_examples": n_examples,
        "distance": "cosine (1 - cos)",
        "checkpoints": records,
        "json": str(json_path),
        "png": str(png_path),
    }
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _distinguish_names(records: list[dict[str, Any]], panels: list[Panel]) -> None:
    """Default names that repeat (two JT checkpoints) get their folder's name appended."""
    names = [r["name"] for r in records]
    if len(set(names)) < len(names):
        for r, (i, p) in zip(records, enumerate(panels), strict=True):
            if names.count(r["name"]) > 1:
                r["name"] = f"{r['name']} ({_folder_label(r['path'])})"
                panels[i] = (r["name"], *p[1:])  # type: ignore[assignment]


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _positive_or_all(text: str) -> int | None:
    import argparse

    if text.strip().lower() in ("all", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of examples or 'all', got {text!r}")
    return value


def _cli_analyze(args: argparse.Namespace) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    result = analyze_checkpoints(
        args.checkpoints,
        args.source,
        args.target,
        split=args.split,
        layer=args.layer,
        n_examples=args.n,
        data_dir=args.data_dir,
        out_dir=args.out,
        labels_for_panels=names,
        device=device,
        batch_size=args.batch_size,
        max_vectors=args.max_vectors,
        seed=args.seed,
        progress=not args.no_progress,
    )
    rows = [
        (
            r["name"],
            str(r["layer"]),
            str(r["n_source"]),
            str(r["n_target"]),
            f"{r['hausdorff']:.4f}",
            f"{r['source_to_target']:.4f}",
            f"{r['target_to_source']:.4f}",
        )
        for r in result["checkpoints"]
    ]
    header = ("model", "layer", "n_source", "n_target", "Hausdorff", "src->tgt", "tgt->src")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"wrote {result['json']}")
    print(f"wrote {result['png']}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``metaxl analyze CKPT [CKPT ...] --source SPEC --target SPEC`` to an argparse subparsers.

    >>> import argparse
    >>> p = argparse.ArgumentParser(); register_cli(p.add_subparsers())
    >>> p.parse_args(["analyze", "ck1", "ck2", "--source", "a", "--target", "b"]).n
    500
    """
    p = subparsers.add_parser(
        "analyze",
        help="Hausdorff distance and PCA plot of source vs target representations (paper sec. 4.5)",
        description="Encode the source and target data with each checkpoint, report the cosine "
        "Hausdorff distance between the two sets of vectors, and draw a PCA scatter per model. "
        "Writes OUT/hausdorff.json and OUT/pca.png.",
    )
    p.add_argument(
        "checkpoints", nargs="+", metavar="CKPT", help="checkpoint folder(s), e.g. runs/jt/checkpoint"
    )
    p.add_argument("--source", required=True, help="source data set (name, folder or file)")
    p.add_argument("--target", required=True, help="target data set (name, folder or file)")
    p.add_argument("--split", default="test", choices=("train", "dev", "test"),
                   help="split to encode (default: test)")
    p.add_argument(
        "--layer", type=int, default=None, help="hidden layer: 0 = embeddings, N = last (default), -1 = last"
    )
    p.add_argument(
        "--n", type=_positive_or_all, default=500, help="examples per data set, or 'all' (default: 500)"
    )
    p.add_argument("--data-dir", default=None, help="folder holding local corpora")
    p.add_argument("--out", default="analysis", help="output folder (default: ./analysis)")
    p.add_argument(
        "--names", default=None, help="panel names, one per checkpoint, comma-separated: JT,MetaXL"
    )
    from .cli import device_arg

    p.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--max-vectors",
        type=int,
        default=None,
        help="cap on vectors per set (random, deterministic); default: all",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling examples and vectors")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli_analyze)
