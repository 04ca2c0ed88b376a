"""One optimisation step per method: target-only, JT, JT+RTN and MetaXL.

The training loop (:mod:`metaxl.train`) is the same for every method; only :meth:`Learner.step`
differs. The MetaXL step follows Algorithm 1 of the paper, with the official code's choices:

1. training loss ``L_train(theta, phi) = L_src(theta, phi) + L_tgt(theta)`` (source through the RTN,
   target half-batch without it) and its gradient ``g = d L_train / d theta``;
2. virtual step ``theta' = theta - a * g`` (``a`` = current main lr unless ``inner_lr`` is set),
   taken functionally with :func:`torch.func.functional_call`, never by mutating parameters;
3. meta loss ``L_meta(theta')`` on a target meta batch; its gradient into phi only:
   ``d L_meta(theta'(phi)) / d phi = -a * d/dphi <g(theta, phi), g'>`` with ``g' = grad L_meta(theta')``
   held constant: *exact* (second-order autograd through ``g``) or *finite-difference* (DARTS:
   ``-a * (grad_phi L_train(theta + e g') - grad_phi L_train(theta - e g')) / 2e``);
4. phi's optimiser steps; then ``L_train`` is recomputed with the new phi and theta's optimiser
   steps on it (gradient clipped).

``L_tgt`` does not depend on phi, so its work is not redone: ``g_tgt = grad L_tgt(theta)`` is
taken once, first order, over all of theta, and kept; only ``g_src = grad L_src`` is taken with
``create_graph`` in the exact mode (``d/dphi <g_tgt, g'> = 0``, so the proxy is
``<g_src, g'>``), ``theta' = theta - a (g_src + g_tgt)`` is freed once ``g'`` is taken, the
finite-difference shifted losses are source-only, and step 4 recomputes only ``L_src`` (new
phi), whose gradient accumulates into the kept ``g_tgt`` before averaging, clipping and the step.
With a GradScaler (fp16) the theta step recomputes the whole ``L_train`` (its backward is scaled);
without a source batch ``L_train`` does not depend on phi and the hypergradient is zero.
:func:`metaxl.reference.metaxl_sgd_step` is the same step written plainly (tests/test_reference.py).

The word-embedding matrix (vocab x d, most of a multilingual encoder's weights) takes the virtual
step on the rows the batches use only (:class:`EmbeddingRows`): the meta loss reads the meta
batch's rows of theta', and ``g_src`` is zero off the source batch's rows, so no other row enters
the hypergradient. Exact, not an approximation; the dense path is kept for torch.distributed
(ranks' batches use different rows), tied input/output embeddings and
``Learner.row_sparse_embeddings = False``.

Under ``torch.distributed`` every gradient is averaged across processes so that one step equals
the single-process step on the global batch.

>>> # see tests/test_meta.py for a complete worked example on a tiny model
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import TrainConfig
from .rtn import RTNInjector

Batch = dict[str, torch.Tensor]

_LAYER_RE = re.compile(r"\.(?:layer|layers|h)\.(\d+)\.")


def param_depth(name: str, num_layers: int) -> int:
    """Depth of a parameter: 0 for embeddings, i for encoder layer i (1-based), N+1 for heads.

    >>> param_depth("bert.embeddings.word_embeddings.weight", 12)
    0
    >>> param_depth("bert.encoder.layer.11.output.dense.weight", 12)
    12
    >>> param_depth("classifier.weight", 12)
    13
    """
    match = _LAYER_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    if ".embeddings." in f".{name}" or "embeddings" in name.split(".")[:2]:
        return 0
    return num_layers + 1


def num_layers(model: nn.Module) -> int:
    """Number of encoder layers, from the model config (0 when it does not say).

    >>> from transformers import BertConfig, BertModel
    >>> num_layers(BertModel(BertConfig(hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
    ...     intermediate_size=8, vocab_size=10)))
    3
    """
    config = getattr(model, "config", None)
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", 0) or 0)


def batch_loss(model: nn.Module, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean loss of ``model`` on ``batch``, optionally at substituted parameters ``params``.

    >>> # loss = batch_loss(model, batch)                     # at the model's own weights
    >>> # loss = batch_loss(model, batch, {"classifier.weight": w})  # functionally at w
    """
    if params is None:
        return model(**batch).loss
    _BOUND.append((model, params))
    try:
        return functional_call(model, params, args=(), kwargs=batch, strict=False).loss
    finally:
        _BOUND.pop()


# Parameters bound by batch_loss's functional_call (innermost last), for checkpoint_context_fn.
_BOUND: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
_SDP_FLAGS = (
    (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
    (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
    (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled),
    (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled),
)


class _Reusable:
    """A context manager entered afresh each time (a graph may be replayed by several backwards)."""

    def __init__(self, make: Callable[[], contextlib.ExitStack]) -> None:
        self.make = make
        self.stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        self.stacks.append(self.make())

    def __exit__(self, *exc: Any) -> None:
        self.stacks.pop().close()


def checkpoint_context_fn(injector: RTNInjector | list[RTNInjector] | None) -> Callable[[], tuple[Any, Any]]:
    """``context_fn`` for non-reentrant activation checkpointing under MetaXL.

    A checkpointed layer is run again in backward, outside the contexts of its first forward; the
    replay must see what that forward saw, or the gradient is wrong (or torch raises): the RTN
    state (source batches pass through it, target batches do not), the attention kernels (the
    exact hypergradient runs on the math kernel, whose double backward exists) and the virtual
    weights theta' that ``functional_call`` bound. Each forward records them; the replay restores them.
    ``injector`` may be a list (several injectors hooked on one model, as in the benchmark).

    >>> from transformers import BertConfig, BertForTokenClassification
    >>> model = BertForTokenClassification(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=8))
    >>> enable_gradient_checkpointing(model, None)   # passes checkpoint_context_fn(None) to torch
    >>> model.bert.encoder.layer[0].gradient_checkpointing
    True
    """
    from torch.nn.utils.stateless import _reparametrize_module  # what functional_call itself uses

    injectors = [] if injector is None else injector if isinstance(injector, list) else [injector]

    def context_fn() -> tuple[Any, Any]:
        rtn_states = [(inj, inj.state) for inj in injectors]
        backends = [backend for backend, enabled in _SDP_FLAGS if enabled()]
        bound = _BOUND[-1] if _BOUND else None

        def replay() -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            for inj, state in rtn_states:
                stack.enter_context(inj.restored(state))
            if backends:
                stack.enter_context(sdpa_kernel(backends))
            if bound is not None:
                stack.enter_context(_reparametrize_module(bound[0], bound[1], tie_weights=True))
            return stack

        return contextlib.nullcontext(), _Reusable(replay)

    return context_fn


def enable_gradient_checkpointing(model: nn.Module, injector: RTNInjector | list[RTNInjector] | None) -> None:
    """Activation checkpointing that is correct for every method (see :func:`checkpoint_context_fn`).

    Call it after the RTN injector is built (the doctest of :func:`checkpoint_context_fn` shows it).
    """
    kwargs: dict[str, Any] = {"use_reentrant": False, "context_fn": checkpoint_context_fn(injector)}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


RngState = tuple[torch.Tensor, tuple[int, torch.Tensor] | None]


def rng_state(device: torch.device) -> RngState:
    """The random state a forward on ``device`` draws its dropout masks from (CPU, plus CUDA's
    generator of that device), for :func:`replayed_rng`.

    >>> s = rng_state(torch.device("cpu"))
    >>> a = torch.rand(2)
    >>> with replayed_rng(s):
    ...     b = torch.rand(2)
    >>> bool((a == b).all()), bool((torch.rand(2) == a).all())
    (True, False)
    """
    cuda = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = (index, torch.cuda.get_rng_state(index))
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replayed_rng(state: RngState) -> Iterator[None]:
    """Run a block from the random state ``state`` (:func:`rng_state`), so that a forward in it
    draws the same dropout masks as the forward that followed the capture; the random state
    outside the block is left as it was (the block consumes nothing from it)."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[] if cuda is None else [cuda[0]]):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda[1], cuda[0])
        yield


def allreduce_mean(tensors: list[torch.Tensor], bucket_numel: int = 2**25) -> None:
    """Average tensors in place across processes (no-op without torch.distributed).

    Tensors are flattened into buckets of up to ``bucket_numel`` elements per (device, dtype), so a
    step makes a few collective calls instead of one per parameter tensor; the order is the list's,
    identical on every rank.
    """
    if not _dist_ready():
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = {}
    for t in tensors:
        buckets = groups.setdefault((t.device, t.dtype), [[]])
        if buckets[-1] and sum(x.numel() for x in buckets[-1]) + t.numel() > bucket_numel:
            buckets.append([])
        buckets[-1].append(t)
    for buckets in groups.values():
        for bucket in buckets:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat.div_(world)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def compact_ids(batch: Batch, padding_idx: int | None) -> torch.Tensor:
    """Sorted token ids a batch uses, plus ``0..padding_idx`` so that the padding row keeps its
    index (``nn.Embedding`` zeroes that row's gradient; XLM-R derives positions from it).

    >>> compact_ids({"input_ids": torch.tensor([[7, 3, 7]])}, 1).tolist()
    [0, 1, 3, 7]
    """
    ids = batch["input_ids"].reshape(-1)
    if padding_idx is not None:
        ids = torch.cat([torch.arange(padding_idx + 1, device=ids.device, dtype=ids.dtype), ids])
    return torch.unique(ids)


def remap_ids(batch: Batch, used: torch.Tensor) -> Batch:
    """The batch with ``input_ids`` replaced by their positions in ``used`` (sorted ids).

    >>> remap_ids({"input_ids": torch.tensor([[7, 3, 0]])}, torch.tensor([0, 1, 3, 7]))["input_ids"].tolist()
    [[3, 2, 0]]
    """
    return {**batch, "input_ids": torch.searchsorted(used, batch["input_ids"])}


def gather_rows(values: torch.Tensor, rows_from: torch.Tensor, rows_to: torch.Tensor) -> torch.Tensor:
    """``values`` holds the rows ``rows_from`` (sorted ids) of a matrix: its rows ``rows_to``,
    zero where absent; differentiable.

    >>> gather_rows(torch.tensor([[1.0], [2.0]]), torch.tensor([3, 5]), torch.tensor([1, 5])).tolist()
    [[0.0], [2.0]]
    """
    pos = torch.searchsorted(rows_from, rows_to).clamp(max=rows_from.numel() - 1)
    hit = (rows_from[pos] == rows_to).unsqueeze(1).to(values.dtype)
    return values.index_select(0, pos) * hit


def mixed_term(grads: Sequence[torch.Tensor | None], cotangents: Sequence[torch.Tensor], phi: Sequence[torch.Tensor]
               ) -> tuple[torch.Tensor | None, ...]:
    """``d/dphi <grads(phi), cotangents>`` with the cotangents held constant: one
    vector-Jacobian product through the graph of ``grads`` (taken with ``create_graph``), with
    no element-wise products, sums or their backward (about 4 kernels per parameter tensor less
    than differentiating ``sum((g * c).sum())``). None where phi is unused.

    >>> phi = torch.tensor([2.0], requires_grad=True)
    >>> g = [phi ** 2, None]               # d/dphi <(phi^2, -), (3, 5)> = 2 * phi * 3
    >>> mixed_term(g, [torch.tensor([3.0]), torch.tensor([5.0])], [phi])[0].tolist()
    [12.0]
    """
    pairs = [(g, c) for g, c in zip(grads, cotangents, strict=True) if g is not None and g.requires_grad]
    if not pairs:
        return (None,) * len(phi)
    return torch.autograd.grad([g for g, _ in pairs], phi, grad_outputs=[c for _, c in pairs], allow_unused=True)


def global_norm(tensors: list[torch.Tensor]) -> float:
    """The 2-norm of a list of tensors taken as one vector (multi-tensor kernels, float32 result).

    >>> global_norm([torch.tensor([3.0]), torch.tensor([[4.0]])])
    5.0
    """
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).float()))


def lr_factor(g_meta: list[torch.Tensor], lrs: list[float]) -> tuple[float, list[torch.Tensor]]:
    """Fold the virtual-step lrs into ``g'``: ``d/dphi <g, A g'>`` with ``A = diag(lrs)`` is
    ``a * d/dphi <g, g'>`` when every lr is ``a`` (returned as ``(a, g')``, unchanged), else
    ``(1, A g')``.

    >>> a, d = lr_factor([torch.ones(2), torch.ones(1)], [0.25, 0.5])
    >>> a, [t.tolist() for t in d]
    (1.0, [[0.25, 0.25], [0.5]])
    >>> lr_factor([torch.ones(2)], [0.5])[0]
    0.5
    """
    if len(set(lrs)) <= 1:
        return (lrs[0] if lrs else 0.0), g_meta
    return 1.0, list(torch._foreach_mul(g_meta, lrs))


def sub_scaled(bases: list[torch.Tensor], grads: list[torch.Tensor], lrs: list[float], inplace: bool = False
               ) -> list[torch.Tensor]:
    """``bases[i] - lrs[i] * grads[i]`` with multi-tensor kernels: new tensors, or ``bases``
    updated in place.

    >>> [t.tolist() for t in sub_scaled([torch.ones(1), torch.ones(1)], [torch.ones(1)] * 2, [0.5, 0.25])]
    [[0.5], [0.75]]
    """
    if not bases:
        return []
    uniform = len(set(lrs)) == 1
    if not uniform:
        grads = list(torch._foreach_mul(grads, [-lr for lr in lrs]))
    alpha = -lrs[0] if uniform else 1.0
    if inplace:
        torch._foreach_add_(bases, grads, alpha=alpha)
        return bases
    return list(torch._foreach_add(bases, grads, alpha=alpha))


def virtual_step(base: Sequence[torch.Tensor], g_src: Sequence[torch.Tensor | None], g_tgt: Sequence[torch.Tensor | None],
                 lrs: list[float]) -> list[torch.Tensor]:
    """theta' = base - lr * (g_src + g_tgt), tensor by tensor (None: no gradient), as new tensors;
    under torch.distributed the gradient sum is averaged across processes first.

    >>> virtual_step([torch.ones(1), torch.ones(1)], [torch.ones(1), None], [torch.ones(1), None], [0.25, 0.25])
    [tensor([0.5000]), tensor([1.])]
    """
    if _dist_ready():
        g_sum = []
        for b, gs, gt in zip(base, g_src, g_tgt, strict=True):
            gi = torch.zeros_like(b) if gs is None else gs.detach().clone()
            if gt is not None:
                gi.add_(gt)
            g_sum.append(gi)
        allreduce_mean(g_sum)
        return [gi.mul_(-lr).add_(b) for b, gi, lr in zip(base, g_sum, lrs, strict=True)]
    # multi-tensor kernels: a few launches instead of two per parameter tensor (GPUs are
    # launch-bound at the paper's batch size)
    have = [i for i, gs in enumerate(g_src) if gs is not None]
    stepped = dict(zip(have, sub_scaled([base[i] for i in have], [g_src[i].detach() for i in have],  # type: ignore[union-attr]
                                        [lrs[i] for i in have]), strict=True))
    primes = [stepped[i] if i in stepped else b.clone() for i, b in enumerate(base)]
    with_tgt = [i for i, gt in enumerate(g_tgt) if gt is not None]
    sub_scaled([primes[i] for i in with_tgt], [g_tgt[i] for i in with_tgt], [lrs[i] for i in with_tgt],  # type: ignore[misc]
               inplace=True)
    return primes


@dataclass
class EmbeddingRows:
    """The word-embedding rows one MetaXL step needs: ``src`` (the source batch's token ids) and
    ``meta`` (the meta batch's), sorted, each with ``0..padding_idx``; ``index`` is the embedding's
    position in :attr:`Learner.virtual_names`.

    The source loss runs on ``W[src]`` with ids remapped (:func:`remap_ids`), so ``g_src`` of the
    embedding is ``len(src) x d``; theta' and ``g'`` hold ``W[meta]`` rows; finite differences shift
    ``W[src]``. :func:`gather_rows` moves a gradient from one row set to the other.
    """

    name: str
    index: int
    src: torch.Tensor
    meta: torch.Tensor


@dataclass
class StepStats:
    loss: float
    meta_loss: float | None = None
    phi_grad_norm: float | None = None
    meta_probe: tuple[float, float] | None = None
    """MetaXL diagnostics step: the meta loss at theta' before and after phi's step (eval mode)."""


class HypergradStats:
    """Running statistics of the hypergradients of an epoch: is phi's gradient a signal or noise?

    ``snr`` is ``||mean g|| / mean ||g||``: 1 when every step's hypergradient points the same way,
    about ``1/sqrt(n)`` for n independent noise vectors; ``cosine`` is the mean cosine between
    successive hypergradients.

    >>> st = HypergradStats()
    >>> for g in ([1.0, 0.0], [1.0, 0.0], [1.0, 0.0]):
    ...     st.add([torch.tensor(g)])
    >>> st.summary()
    {'hypergrad_snr': 1.0, 'hypergrad_cosine': 1.0, 'hypergrad_steps': 3}
    >>> st.reset(); st.add([torch.tensor([1.0, 0.0])]); st.add([torch.tensor([-1.0, 0.0])])
    >>> st.summary()["hypergrad_snr"], st.summary()["hypergrad_cosine"]
    (0.0, -1.0)
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None
        self.norm_sum = 0.0
        self.cos_sum = 0.0
        self.count = 0
        self.cos_count = 0

    @torch.no_grad()
    def add(self, grads: Sequence[torch.Tensor]) -> None:
        flat = torch.cat([g.detach().reshape(-1).double().cpu() for g in grads])
        norm = float(flat.norm())
        if not math.isfinite(norm):
            return
        self.total = flat.clone() if self.total is None else self.total.add_(flat)
        if self.prev is not None:
            denom = norm * float(self.prev.norm())
            if denom > 0:
                self.cos_sum += float(flat @ self.prev) / denom
                self.cos_count += 1
        self.prev = flat
        self.norm_sum += norm
        self.count += 1

    def summary(self) -> dict[str, float | int | None]:
        snr = None
        if self.total is not None and self.norm_sum > 0:
            snr = round(float(self.total.norm()) / self.norm_sum, 6)
        cos = round(self.cos_sum / self.cos_count, 6) if self.cos_count else None
        return {"hypergrad_snr": snr, "hypergrad_cosine": cos, "hypergrad_steps": self.count}


class Learner:
    """Holds the model, the RTNs and both optimisers, and takes one step of the chosen method.

    Args:
        model: HF model with a classification head, returning ``.loss`` when given ``labels``.
        injector: the RTNs (None for target-only and JT).
        cfg: the training configuration (method, hypergrad, inner_lr, ...).
        opt_theta, sched_theta: optimiser and lr schedule of the model parameters.
        opt_phi, sched_phi: those of the RTN parameters (None without RTN).
        autocast: a context-manager factory for mixed precision (``contextlib.nullcontext`` in fp32).
        scaler: a ``torch.amp.GradScaler`` for fp16, else None.

    ``row_sparse_embeddings`` (class attribute, True): the word embeddings' virtual step on the
    batches' rows only (:class:`EmbeddingRows`); False takes it densely (same values; the
    benchmark's ``-dense-emb``).
    """

    row_sparse_embeddings: bool = True

    def __init__(
        self,
        model: nn.Module,
        injector: RTNInjector | None,
        cfg: TrainConfig,
        opt_theta: torch.optim.Optimizer,
        sched_theta: Any,
        opt_phi: torch.optim.Optimizer | None = None,
        sched_phi: Any = None,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        scaler: Any = None,
    ) -> None:
        self.model = model
        self.injector = injector
        self.cfg = cfg
        self.opt_theta = opt_theta
        self.sched_theta = sched_theta
        self.opt_phi = opt_phi
        self.sched_phi = sched_phi
        self.autocast = autocast
        self.scaler = scaler
        self.method = cfg.method
        self.theta = {n: p for n, p in model.named_parameters() if p.requires_grad}
        depth = num_layers(model)
        self.virtual_names = [n for n in self.theta if param_depth(n, depth) >= cfg.virtual_from_layer]
        self.other_names = [n for n in self.theta if param_depth(n, depth) < cfg.virtual_from_layer]
        self.phi = list(injector.parameters()) if injector is not None else []
        self.hypergrad_stats = HypergradStats()
        self.steps_taken = 0
        self.source_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        """Entered around every source-batch forward, whatever the method (the planted-shift check
        of benchmarks/planted_shift.py distorts source batches through it)."""

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _rtn(self, source: int) -> Iterator[None]:
        if self.injector is None:
            yield
        else:
            with self.injector.applied(source):
                yield

    def current_lr(self) -> float:
        return float(self.opt_theta.param_groups[0]["lr"])

    def inner_lr(self) -> float:
        """The virtual-step lr ``a``: fixed, or the current main lr (official code)."""
        return self.cfg.inner_lr if self.cfg.inner_lr is not None else self.current_lr()

    def inner_lrs(self) -> list[float]:
        """The virtual-step lr of each parameter in :attr:`virtual_names`: :meth:`inner_lr` for
        all, or with ``inner_lr_per_group`` the current lr of the optimiser group that holds it
        (the task head's ``head_lr``), so the virtual step scales each part as the real step does."""
        if not self.cfg.inner_lr_per_group:
            return [self.inner_lr()] * len(self.virtual_names)
        return self._group_lrs("lr")

    def _group_lrs(self, key: str) -> list[float]:
        """Each :attr:`virtual_names` parameter's optimiser-group ``key`` (``lr``, or ``initial_lr``
        falling back to ``lr`` before a scheduler sets it)."""
        lr_of = {id(p): float(group.get(key, group["lr"])) for group in self.opt_theta.param_groups
                 for p in group["params"]}
        return [lr_of[id(self.theta[n])] for n in self.virtual_names]

    def meta_factor(self, g_meta: list[torch.Tensor], lrs: list[float]) -> tuple[float, list[torch.Tensor]]:
        """The factor ``a`` and the cotangents of ``dL_meta/dphi = -a d/dphi <g, A g'>`` (see
        :func:`lr_factor`). With ``hypergrad_scale=inverse-lr`` the hypergradient is taken per unit
        of the encoder's inner lr: ``a = 1`` and each tensor's lr relative to the encoder's (the
        groups' ``initial_lr`` ratio, so the same at every point of the schedule, warm-up included);
        ``unit`` takes the same direction (:meth:`metaxl_step` then scales it to norm 1)."""
        if self.cfg.hypergrad_scale == "none":
            return lr_factor(g_meta, lrs)
        if not self.cfg.inner_lr_per_group:
            return 1.0, g_meta
        ref = float(self.opt_theta.param_groups[0].get("initial_lr", self.opt_theta.param_groups[0]["lr"]))
        rel = [lr / ref for lr in self._group_lrs("initial_lr")]
        return (1.0, list(torch._foreach_mul(g_meta, rel))) if len(set(rel)) > 1 else (1.0, g_meta)

    def meta_loss_at_virtual(self, src: Batch | None, source: int, tgt: Batch | None, meta: Batch) -> float:
        """``L_meta(theta - a grad L_train(theta, phi))`` at the current phi, in eval mode (no
        dropout, no random draw: training is unchanged): the diagnostics' meta loss before and
        after phi's step. Dense, first order."""
        was_training = self.model.training
        self.model.eval()
        try:
            names = self.virtual_names
            theta = [self.theta[n] for n in names]
            loss = self.train_loss(src, source, tgt)
            g = torch.autograd.grad(loss, theta, allow_unused=True)
            primes = virtual_step([p.detach() for p in theta], list(g), [None] * len(theta), self.inner_lrs())
            with torch.no_grad(), self.autocast():
                return float(batch_loss(self.model, meta, dict(zip(names, primes, strict=True))))
        finally:
            self.model.train(was_training)

    def train_loss(
        self,
        src: Batch | None,
        source: int,
        tgt: Batch | None,
        params: dict[str, torch.Tensor] | None = None,
        rtn: bool = True,
        fp32: bool = False,
    ) -> torch.Tensor:
        """``w L_src`` (through the RTN when ``rtn``; ``w`` = ``source_weight``) + ``L_tgt`` (never
        through the RTN); under the run's autocast unless ``fp32`` (the finite-difference shifted
        forwards: see there)."""
        total: torch.Tensor | None = None
        with contextlib.nullcontext() if fp32 else self.autocast():
            if src is not None:
                with self.source_context(), self._rtn(source) if rtn else contextlib.nullcontext():
                    total = batch_loss(self.model, src, params)
                if self.cfg.source_weight != 1.0:
                    total = total * self.cfg.source_weight
            if tgt is not None:
                loss_t = batch_loss(self.model, tgt, params)
                total = loss_t if total is None else total + loss_t
        assert total is not None, "a step needs a source or a target batch"
        return total

    def _update_theta(
        self,
        loss: torch.Tensor | None,
        extra: list[torch.nn.Parameter] | None = None,
        kept: list[torch.Tensor | None] | None = None,
    ) -> None:
        """Backward ``loss`` into theta (and ``extra``), average across processes, clip, step.

        ``kept``: gradients of another loss over theta (in ``self.theta``'s order, not scaled)
        that the backward accumulates into, so the sum is averaged, clipped and stepped once;
        ``loss`` None: ``kept`` is the whole gradient.
        """
        params = list(self.theta.values()) + (extra or [])
        if kept is not None:
            assert self.scaler is None, "kept gradients are not scaled"
            for p, gk in zip(self.theta.values(), kept, strict=True):
                if gk is not None:
                    p.grad = gk
        if loss is None:
            assert kept is not None, "a theta step needs a loss or gradients"
        elif self.scaler is not None:
            self.scaler.scale(loss).backward(inputs=params)
        else:
            loss.backward(inputs=params)
        allreduce_mean([p.grad for p in params if p.grad is not None])
        if self.scaler is not None:
            self.scaler.unscale_(self.opt_theta)
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.opt_theta)
            self.scaler.update()
        else:
            self.opt_theta.step()
        self.sched_theta.step()
        self.opt_theta.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ steps
    def step(self, src: Batch | None, source: int, tgt: Batch | None, meta: Batch | None = None) -> StepStats:
        """One optimisation step of ``cfg.method`` on a source batch, a target batch and, for
        MetaXL, a target meta batch (``meta``; None means: split ``tgt`` in halves)."""
        if self.method == "target-only":
            loss = self.train_loss(None, source, tgt)
            self._update_theta(loss)
            return StepStats(loss=float(loss.detach()))
        if self.method == "jt":
            loss = self.train_loss(src, source, tgt, rtn=False)
            self._update_theta(loss)
            return StepStats(loss=float(loss.detach()))
        if self.method == "jt-rtn":
            # same forward as MetaXL, plain gradient descent on theta and phi together
            loss = self.train_loss(src, source, tgt)
            assert self.opt_phi is not None
            self._update_theta(loss, extra=self.phi)
            self.opt_phi.step()
            self.sched_phi.step()
            self.opt_phi.zero_grad(set_to_none=True)
            return StepStats(loss=float(loss.detach()))
        if self.method == "metaxl":
            if meta is None:
                assert tgt is not None
                tgt, meta = split_batch(tgt)
            return self.metaxl_step(src, source, tgt, meta)
        raise ValueError(f"unknown method {self.method}")

    def hypergradient(
        self, src: Batch | None, source: int, tgt: Batch | None, meta: Batch
    ) -> tuple[list[torch.Tensor], float]:
        """``d L_meta(theta - a * grad L_train(theta, phi)) / d phi`` at the current theta, phi.

        Returns the gradient for each RTN parameter and the meta loss. ``cfg.hypergrad`` picks
        the exact second-order computation or the finite-difference approximation.
        """
        phi_grads, meta_loss, _, _ = self._hypergradient(src, source, tgt, meta)
        return phi_grads, meta_loss

    def _target_gradient(
        self, source: int, tgt: Batch | None
    ) -> tuple[list[torch.Tensor | None] | None, dict[str, torch.Tensor], float]:
        """``grad_theta L_tgt(theta)``, first order, over all of theta: as a list in ``self.theta``
        order (None without a target batch), as a dict without unused parameters, and the loss."""
        if tgt is None:
            return None, {}, 0.0
        loss_tgt = self.train_loss(None, source, tgt)
        g_all: list[torch.Tensor | None] = list(torch.autograd.grad(loss_tgt, list(self.theta.values()), allow_unused=True))
        g = {n: gt for n, gt in zip(self.theta, g_all, strict=True) if gt is not None}
        return g_all, g, float(loss_tgt.detach())

    def embedding_rows(self, src: Batch | None, meta: Batch) -> EmbeddingRows | None:
        """The rows the word embeddings' virtual step needs (:class:`EmbeddingRows`), or None
        where the dense step is taken: embeddings frozen or below ``virtual_from_layer``, weights
        tied to an output layer, torch.distributed, ``row_sparse_embeddings = False``, no source batch."""
        if src is None or not self.row_sparse_embeddings or _dist_ready() or "input_ids" not in src or "input_ids" not in meta:
            return None
        emb = self.model.get_input_embeddings()  # type: ignore[operator]
        out = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None  # type: ignore[operator]
        if not isinstance(emb, nn.Embedding) or (out is not None and getattr(out, "weight", None) is emb.weight):
            return None
        name = next((n for n in self.virtual_names if self.theta[n] is emb.weight), None)
        if name is None:
            return None
        pad = emb.padding_idx
        if pad is None:
            pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        return EmbeddingRows(name, self.virtual_names.index(name), compact_ids(src, pad), compact_ids(meta, pad))

    def _hypergradient(
        self, src: Batch | None, source: int, tgt: Batch | None, meta: Batch
    ) -> tuple[list[torch.Tensor], float, list[torch.Tensor | None] | None, float]:
        """The hypergradient, the meta loss, and the target gradient over all of theta (None
        when it was not kept) with the target loss, for :meth:`metaxl_step` to reuse.

        ``L_tgt`` does not depend on phi: its gradient is taken once, first order, over all of
        theta and kept for the theta step; only ``L_src`` is differentiated with ``create_graph``
        (the phi-derivative of ``<g_tgt, g'>`` is 0) and the finite-difference shifted losses are
        source-only. The word embeddings take the virtual step on the batches' rows
        (:meth:`embedding_rows`). With a GradScaler (fp16) the target gradient is not returned
        (theta's step backpropagates the whole scaled loss).
        """
        names = self.virtual_names
        theta = [self.theta[n] for n in names]
        lrs = self.inner_lrs()
        exact = self.cfg.hypergrad == "exact"
        rows = self.embedding_rows(src, meta)

        # (1a) g_tgt = grad_theta L_tgt(theta), first order, over all of theta (kept)
        g_tgt_all, g_tgt, loss_t = self._target_gradient(source, tgt)

        # (1b) g_src = grad_theta L_src(theta, phi); a graph through it is kept in the exact mode.
        # Fused attention kernels have no double backward: the exact mode uses the math kernel.
        # With embedding rows, the source loss reads W[rows.src] (a differentiable slice of W).
        inputs: list[torch.Tensor] = list(theta)
        src_sub: dict[str, torch.Tensor] | None = None
        src_in = src
        if rows is not None and src is not None:
            w_src = theta[rows.index].index_select(0, rows.src)
            inputs = [w_src if i == rows.index else p for i, p in enumerate(theta)]
            src_sub, src_in = {rows.name: w_src}, remap_ids(src, rows.src)
        rng = rng_state(theta[0].device)  # finite differences: the shifted forwards replay its dropout masks
        # reuse_source_gradient: also the parameters outside the virtual step, for theta's step
        reuse = self.cfg.reuse_source_gradient and self.scaler is None
        others: list[torch.Tensor] = [self.theta[n] for n in self.other_names] if reuse else []
        with sdpa_kernel([SDPBackend.MATH]) if exact else contextlib.nullcontext():
            g_src, loss_s_value = self._source_gradient(src_in, source, inputs + others, src_sub, exact)
        g_src_kept: list[torch.Tensor | None] | None = None
        if reuse:
            g_src_kept = [None if g is None else g.detach() for g in g_src]
        g_src = g_src[: len(names)]
        del src_sub, inputs
        if rows is not None and g_src[rows.index] is not None:  # the source gradient at the meta rows
            g_src[rows.index] = gather_rows(g_src[rows.index], rows.src, rows.meta)  # type: ignore[arg-type]

        # (2) virtual step theta' = theta - a (g_src + g_tgt) (a per tensor with inner_lr_per_group),
        # g averaged across processes; the embedding's theta' holds the meta batch's rows only
        base = [p.detach() for p in theta]
        step_tgt = [g_tgt.get(n) for n in names]
        if rows is not None:
            base[rows.index] = base[rows.index].index_select(0, rows.meta)
            gt = step_tgt[rows.index]
            step_tgt[rows.index] = None if gt is None else gt.index_select(0, rows.meta)
        primes = virtual_step(base, g_src, step_tgt, lrs)
        del base, step_tgt
        theta_prime = {n: tp.requires_grad_() for n, tp in zip(names, primes, strict=True)}
        del primes
        if g_src_kept is not None:  # theta's step will use g_src + g_tgt at the old phi
            g_tgt_all = self._add_source_gradient(g_tgt_all, g_src_kept, rows)
            loss_t += loss_s_value
            del g_src_kept
        # g' = grad L_meta(theta'); theta' is freed once g' is taken
        with self.autocast():
            meta_loss = batch_loss(self.model, meta if rows is None else remap_ids(meta, rows.meta), theta_prime)
        raw = torch.autograd.grad(meta_loss, list(theta_prime.values()), allow_unused=True)
        g_meta = [torch.zeros_like(tp) if gm is None else gm.detach() for tp, gm in zip(theta_prime.values(), raw, strict=True)]
        meta_value = float(meta_loss.detach())
        del theta_prime, raw, meta_loss
        allreduce_mean(g_meta)

        # (3) d L_meta / d phi = -a * d/dphi <g_src(phi), g'> (per-tensor lrs folded into g')
        a, g_meta = self.meta_factor(g_meta, lrs)
        if exact or src is None:  # (no source batch: nothing depends on phi, mixed_term gives zeros)
            grads = mixed_term(g_src, g_meta, self.phi)
            del g_src
            phi_grads = [torch.zeros_like(p) if d is None else -a * d for p, d in zip(self.phi, grads, strict=True)]
        else:
            del g_src
            eps = self.cfg.fd_epsilon / max(global_norm(g_meta), 1e-12)
            base = [p.detach() for p in theta]
            if rows is not None:  # shift the source batch's rows, by g' there (0 off the meta rows)
                base[rows.index] = base[rows.index].index_select(0, rows.src)
                g_meta[rows.index] = gather_rows(g_meta[rows.index], rows.meta, rows.src)

            def phi_grad_at(sign: float) -> tuple[torch.Tensor | None, ...]:
                shifted = {n: torch.add(b, gm, alpha=sign * eps) for n, b, gm in zip(names, base, g_meta, strict=True)}
                # fp32 even under bf16 autocast: the central difference subtracts two phi-gradients that
                # differ by O(eps); bf16's rounding (2**-8) of the two forwards swamps that difference
                # (cosine to the fp32 value down to 0.44 on the tiny model; 0.99+ with fp32 shifts)
                with replayed_rng(rng):  # the dropout masks of g_src's forward, at both shifts
                    loss_sh = self.train_loss(src_in, source, None, params=shifted, fp32=self.scaler is None)
                return torch.autograd.grad(loss_sh, self.phi, allow_unused=True)

            phi_grads = self._central_difference(phi_grad_at, a, eps)
        allreduce_mean(phi_grads)
        return phi_grads, meta_value, (g_tgt_all if self.scaler is None else None), loss_t

    def _source_gradient(
        self, src: Batch | None, source: int, inputs: list[torch.Tensor], params: dict[str, torch.Tensor] | None,
        exact: bool,
    ) -> tuple[list[torch.Tensor | None], float]:
        """``grad L_src`` with respect to ``inputs`` (with ``create_graph`` when ``exact``) and
        ``L_src``; without a source batch, no gradient and 0."""
        if src is None:
            return [None] * len(inputs), 0.0
        loss_s = self.train_loss(src, source, None, params=params)
        grads: list[torch.Tensor | None] = list(torch.autograd.grad(loss_s, inputs, create_graph=exact, allow_unused=True))
        return grads, float(loss_s.detach())

    def _add_source_gradient(
        self, g_tgt_all: list[torch.Tensor | None] | None, g_src: list[torch.Tensor | None], rows: EmbeddingRows | None
    ) -> list[torch.Tensor | None]:
        """``g_tgt + g_src`` over all of theta, in ``self.theta``'s order, in place where possible.
        ``g_src`` is in :attr:`virtual_names` order, then the other parameters of theta; with
        ``rows``, the embedding's entry holds the source batch's rows only."""
        names = self.virtual_names + self.other_names
        by_name = dict(zip(names, g_src, strict=True))
        out: list[torch.Tensor | None] = []
        for i, (n, p) in enumerate(self.theta.items()):
            gt = None if g_tgt_all is None else g_tgt_all[i]
            gs = by_name.get(n)
            if gs is None:
                out.append(gt)
            elif rows is not None and n == rows.name:
                out.append((torch.zeros_like(p) if gt is None else gt).index_add_(0, rows.src, gs))
            else:
                out.append(gs.clone() if gt is None else gt.add_(gs))
        return out

    def _central_difference(
        self, phi_grad_at: Callable[[float], tuple[torch.Tensor | None, ...]], a: float, eps: float
    ) -> list[torch.Tensor]:
        """``-a * (grad_phi at +eps - grad_phi at -eps) / 2 eps``, zeros where phi is unused."""
        plus, minus = phi_grad_at(1.0), phi_grad_at(-1.0)
        phi_grads = []
        for p, gp, gn in zip(self.phi, plus, minus, strict=True):
            gp = torch.zeros_like(p) if gp is None else gp
            gn = torch.zeros_like(p) if gn is None else gn
            phi_grads.append(-a * (gp - gn) / (2 * eps))
        return phi_grads

    def metaxl_step(self, src: Batch | None, source: int, tgt: Batch | None, meta: Batch) -> StepStats:
        """Algorithm 1: hypergradient into phi, phi step, then theta step with the new phi.

        The theta step reuses the target gradient kept by the hypergradient: only the source
        loss is recomputed (with the new phi) and its gradient accumulates into the kept one.
        With ``reuse_source_gradient`` (opt-in, an approximation) the source gradient taken for
        the hypergradient, at the old phi, is reused too: no forward or backward in the theta step.
        """
        assert self.opt_phi is not None
        every = self.cfg.diagnostics_every
        probe = bool(every) and self.steps_taken % every == 0
        self.steps_taken += 1
        before = self.meta_loss_at_virtual(src, source, tgt, meta) if probe else None
        phi_grads, meta_loss, g_tgt, loss_t = self._hypergradient(src, source, tgt, meta)
        finite = all(torch.isfinite(d).all() for d in phi_grads)
        phi_norm = math.sqrt(sum(float((d.float() ** 2).sum()) for d in phi_grads)) if finite else float("nan")
        if finite:
            self.hypergrad_stats.add(phi_grads)
            unit = 1.0 / phi_norm if self.cfg.hypergrad_scale == "unit" and phi_norm > 0 else 1.0
            for p, d in zip(self.phi, phi_grads, strict=True):
                p.grad = (d * unit).to(p.dtype)
            self.opt_phi.step()
        self.sched_phi.step()
        self.opt_phi.zero_grad(set_to_none=True)
        meta_probe = None
        if before is not None:
            meta_probe = (before, self.meta_loss_at_virtual(src, source, tgt, meta))

        if g_tgt is None:
            loss = self.train_loss(src, source, tgt)  # recomputed with the new phi
            self._update_theta(loss)
            return StepStats(float(loss.detach()), meta_loss, phi_norm, meta_probe)
        if src is None or self.cfg.reuse_source_gradient:
            # the kept gradient is all of grad L_train: no source batch, or it already holds g_src
            # at the old phi (reuse_source_gradient, approximate): no recomputation
            self._update_theta(None, kept=g_tgt)
            return StepStats(loss_t, meta_loss, phi_norm, meta_probe)
        loss = self.train_loss(src, source, None)  # the source part, recomputed with the new phi
        self._update_theta(loss, kept=g_tgt)
        return StepStats(float(loss.detach()) + loss_t, meta_loss, phi_norm, meta_probe)


def split_batch(batch: Batch) -> tuple[Batch, Batch]:
    """Split a target batch in halves: the first trains theta, the second is the meta batch
    (the official code's default).

    >>> b = {"input_ids": torch.arange(8).view(4, 2)}
    >>> first, second = split_batch(b)
    >>> first["input_ids"].shape[0], second["input_ids"].shape[0]
    (2, 2)
    """
    n = next(iter(batch.values())).shape[0]
    if n < 2:
        raise ValueError("cannot split a target batch of one example into train and meta halves")
    half = n // 2
    return {k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}
