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
With a GradScaler (fp16) the joint computation through ``L_train`` is kept
(:meth:`Learner._hypergradient_joint`). Same maths either way, up to rounding and dropout masks.

Under ``torch.distributed`` every gradient is averaged across processes so that one step equals
the single-process step on the global batch.

>>> # see tests/test_meta.py for a complete worked example on a tiny model
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
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


@dataclass
class StepStats:
    loss: float
    meta_loss: float | None = None
    phi_grad_norm: float | None = None


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
    """

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
        self.phi = list(injector.parameters()) if injector is not None else []

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

    def train_loss(
        self,
        src: Batch | None,
        source: int,
        tgt: Batch | None,
        params: dict[str, torch.Tensor] | None = None,
        rtn: bool = True,
    ) -> torch.Tensor:
        """``L_src`` (through the RTN when ``rtn``) + ``L_tgt`` (never through the RTN)."""
        total: torch.Tensor | None = None
        with self.autocast():
            if src is not None:
                if rtn:
                    with self._rtn(source):
                        total = batch_loss(self.model, src, params)
                else:
                    total = batch_loss(self.model, src, params)
            if tgt is not None:
                loss_t = batch_loss(self.model, tgt, params)
                total = loss_t if total is None else total + loss_t
        assert total is not None, "a step needs a source or a target batch"
        return total

    def _update_theta(
        self,
        loss: torch.Tensor,
        extra: list[torch.nn.Parameter] | None = None,
        kept: list[torch.Tensor | None] | None = None,
    ) -> None:
        """Backward ``loss`` into theta (and ``extra``), average across processes, clip, step.

        ``kept``: gradients of another loss over theta (in ``self.theta``'s order, not scaled)
        that the backward accumulates into, so the sum is averaged, clipped and stepped once.
        """
        params = list(self.theta.values()) + (extra or [])
        if kept is not None:
            assert self.scaler is None, "kept gradients are not scaled"
            for p, gk in zip(self.theta.values(), kept, strict=True):
                if gk is not None:
                    p.grad = gk
        if self.scaler is not None:
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

    def _hypergradient(
        self, src: Batch | None, source: int, tgt: Batch | None, meta: Batch
    ) -> tuple[list[torch.Tensor], float, list[torch.Tensor | None] | None, float]:
        """The hypergradient, the meta loss, and the target gradient over all of theta (None
        when it was not kept) with the target loss, for :meth:`metaxl_step` to reuse.

        ``L_tgt`` does not depend on phi: its gradient is taken once, first order, over all of
        theta and kept for the theta step; only ``L_src`` is differentiated with ``create_graph``
        (the phi-derivative of ``<g_tgt, g'>`` is 0) and the finite-difference shifted losses are
        source-only. With a GradScaler (fp16) or without a source batch, the joint computation
        :meth:`_hypergradient_joint` is used instead.
        """
        if self.scaler is not None or src is None:
            phi_grads, meta_value = self._hypergradient_joint(src, source, tgt, meta)
            return phi_grads, meta_value, None, 0.0
        names = self.virtual_names
        theta = [self.theta[n] for n in names]
        a = self.inner_lr()
        exact = self.cfg.hypergrad == "exact"

        # (1a) g_tgt = grad_theta L_tgt(theta), first order, over all of theta (kept)
        g_tgt_all, g_tgt, loss_t = self._target_gradient(source, tgt)

        # (1b) g_src = grad_theta L_src(theta, phi); a graph through it is kept in the exact mode.
        # Fused attention kernels have no double backward: the exact mode uses the math kernel.
        with sdpa_kernel([SDPBackend.MATH]) if exact else contextlib.nullcontext():
            loss_s = self.train_loss(src, source, None)
        g_src = list(torch.autograd.grad(loss_s, theta, create_graph=exact, allow_unused=True))
        del loss_s

        # (2) virtual step theta' = theta - a (g_src + g_tgt), g averaged across processes
        theta_prime: dict[str, torch.Tensor] = {}
        if _dist_ready():
            g_sum = []
            for n, p, gs in zip(names, theta, g_src, strict=True):
                gi = torch.zeros_like(p) if gs is None else gs.detach().clone()
                if n in g_tgt:
                    gi.add_(g_tgt[n])
                g_sum.append(gi)
            allreduce_mean(g_sum)
            for n, p, gi in zip(names, theta, g_sum, strict=True):
                theta_prime[n] = gi.mul_(-a).add_(p.detach()).requires_grad_()
            del g_sum
        else:
            # multi-tensor kernels: a few launches instead of two per parameter tensor (GPUs are
            # launch-bound at the paper's batch size)
            primes: list[torch.Tensor | None] = [None] * len(theta)
            have = [i for i, gs in enumerate(g_src) if gs is not None]
            if have:
                stepped = torch._foreach_add([theta[i].detach() for i in have],
                                             [g_src[i].detach() for i in have], alpha=-a)  # type: ignore[index]
                for i, tp in zip(have, stepped, strict=True):
                    primes[i] = tp
            full = [tp if tp is not None else p.detach().clone() for tp, p in zip(primes, theta, strict=True)]
            with_tgt = [i for i, n in enumerate(names) if n in g_tgt]
            if with_tgt:
                torch._foreach_add_([full[i] for i in with_tgt], [g_tgt[names[i]] for i in with_tgt], alpha=-a)
            theta_prime = {n: tp.requires_grad_() for n, tp in zip(names, full, strict=True)}
        # g' = grad L_meta(theta'); theta' is freed once g' is taken
        with self.autocast():
            meta_loss = batch_loss(self.model, meta, theta_prime)
        raw = torch.autograd.grad(meta_loss, list(theta_prime.values()), allow_unused=True)
        g_meta = [torch.zeros_like(p) if gm is None else gm.detach() for p, gm in zip(theta, raw, strict=True)]
        meta_value = float(meta_loss.detach())
        del theta_prime, raw, meta_loss
        allreduce_mean(g_meta)

        # (3) d L_meta / d phi = -a * d/dphi <g_src(phi), g'>
        if exact:
            terms = [(gs * gm).sum() for gs, gm in zip(g_src, g_meta, strict=True) if gs is not None]
            grads: tuple[torch.Tensor | None, ...] = (None,) * len(self.phi)
            if terms:
                grads = torch.autograd.grad(torch.stack(terms).sum(), self.phi, allow_unused=True)
            del terms, g_src
            phi_grads = [torch.zeros_like(p) if d is None else -a * d for p, d in zip(self.phi, grads, strict=True)]
        else:
            del g_src
            norm = torch.stack([(gm.float() ** 2).sum() for gm in g_meta]).sum().sqrt()
            eps = self.cfg.fd_epsilon / max(float(norm), 1e-12)

            def phi_grad_at(sign: float) -> tuple[torch.Tensor | None, ...]:
                shifted = {
                    n: torch.add(p.detach(), gm, alpha=sign * eps) for n, p, gm in zip(names, theta, g_meta, strict=True)
                }
                loss_sh = self.train_loss(src, source, None, params=shifted)
                return torch.autograd.grad(loss_sh, self.phi, allow_unused=True)

            phi_grads = self._central_difference(phi_grad_at, a, eps)
        allreduce_mean(phi_grads)
        return phi_grads, meta_value, g_tgt_all, loss_t

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

    def _hypergradient_joint(
        self, src: Batch | None, source: int, tgt: Batch | None, meta: Batch
    ) -> tuple[list[torch.Tensor], float]:
        """The hypergradient from the joint ``L_train = L_src + L_tgt`` (second order through
        both in the exact mode): the GradScaler (fp16) and target-only code path."""
        names = self.virtual_names
        theta = [self.theta[n] for n in names]
        a = self.inner_lr()
        exact = self.cfg.hypergrad == "exact"

        # (1) g = grad_theta L_train(theta, phi); a graph through g is kept for the exact mode.
        # Fused attention kernels have no double backward: the exact mode uses the math kernel.
        with sdpa_kernel([SDPBackend.MATH]) if exact else contextlib.nullcontext():
            loss = self.train_loss(src, source, tgt)
        raw = torch.autograd.grad(loss, theta, create_graph=exact, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(theta, raw, strict=True)]
        g_avg = [gi.detach().clone() for gi in g]
        allreduce_mean(g_avg)

        # (2) virtual step theta' = theta - a g, and g' = grad L_meta(theta')
        theta_prime = {
            n: (p.detach() - a * gi).requires_grad_() for n, p, gi in zip(names, theta, g_avg, strict=True)
        }
        with self.autocast():
            meta_loss = batch_loss(self.model, meta, theta_prime)
        raw = torch.autograd.grad(meta_loss, list(theta_prime.values()), allow_unused=True)
        g_meta = [torch.zeros_like(p) if gm is None else gm.detach() for p, gm in zip(theta, raw, strict=True)]
        allreduce_mean(g_meta)

        # (3) d L_meta / d phi = -a * d/dphi <g(phi), g'>
        if exact:
            proxy = torch.stack([(gi * gm).sum() for gi, gm in zip(g, g_meta, strict=True)]).sum()
            grads = torch.autograd.grad(proxy, self.phi, allow_unused=True)
            phi_grads = [torch.zeros_like(p) if d is None else -a * d for p, d in zip(self.phi, grads, strict=True)]
        else:
            del g, loss
            norm = torch.stack([(gm.float() ** 2).sum() for gm in g_meta]).sum().sqrt()
            eps = self.cfg.fd_epsilon / max(float(norm), 1e-12)

            def phi_grad_at(sign: float) -> tuple[torch.Tensor | None, ...]:
                shifted = {
                    n: (p.detach() + sign * eps * gm) for n, p, gm in zip(names, theta, g_meta, strict=True)
                }
                loss_s = self.train_loss(src, source, tgt, params=shifted)
                return torch.autograd.grad(loss_s, self.phi, allow_unused=True)

            phi_grads = self._central_difference(phi_grad_at, a, eps)
        allreduce_mean(phi_grads)
        return phi_grads, float(meta_loss.detach())

    def metaxl_step(self, src: Batch | None, source: int, tgt: Batch | None, meta: Batch) -> StepStats:
        """Algorithm 1: hypergradient into phi, phi step, then theta step with the new phi.

        The theta step reuses the target gradient kept by the hypergradient: only the source
        loss is recomputed (with the new phi) and its gradient accumulates into the kept one.
        """
        assert self.opt_phi is not None
        phi_grads, meta_loss, g_tgt, loss_t = self._hypergradient(src, source, tgt, meta)
        finite = all(torch.isfinite(d).all() for d in phi_grads)
        if finite:
            for p, d in zip(self.phi, phi_grads, strict=True):
                p.grad = d.to(p.dtype)
            self.opt_phi.step()
        self.sched_phi.step()
        self.opt_phi.zero_grad(set_to_none=True)
        phi_norm = math.sqrt(sum(float((d.float() ** 2).sum()) for d in phi_grads)) if finite else float("nan")

        if g_tgt is None:
            loss = self.train_loss(src, source, tgt)  # recomputed with the new phi
            self._update_theta(loss)
            return StepStats(loss=float(loss.detach()), meta_loss=meta_loss, phi_grad_norm=phi_norm)
        loss = self.train_loss(src, source, None)  # the source part, recomputed with the new phi
        self._update_theta(loss, kept=g_tgt)
        return StepStats(loss=float(loss.detach()) + loss_t, meta_loss=meta_loss, phi_grad_norm=phi_norm)


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
