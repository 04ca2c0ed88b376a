#!/usr/bin/env python
"""Cost of one optimisation step per method: time and peak memory, measured interleaved.

For one model, every method gets its own :class:`metaxl.meta.Learner`, optimisers and (for RTN
methods) its own RTN injector, all over the *same* model weights. After warm-up rounds, each round
takes one step of every method in turn on the same random batch (round-robin), so slow drifts of
a shared machine hit every method alike; the figure of merit is the ratio of medians to JT.

Memory is the peak during a step. On CUDA: ``torch.cuda.max_memory_allocated`` (reset before the
step). On CPU: the process's peak RSS during the step, from a thread sampling ``/proc/self/statm``
about every millisecond and from the kernel's exact high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` where allowed), with ``malloc_trim(0)`` before every step so memory freed
by the previous method does not hide the next one's allocations. Because all methods live in one
process (every method's optimiser state is resident), the comparable figure is the *training
footprint* of a method: model weights + its own optimiser state + the step's peak increment above
the memory held before the step. Absolute peaks and peaks above the RSS before the model was built
are reported too.

Method names: a base (``jt``, ``jt-rtn``, ``metaxl``, ``target-only``) and optional suffixes:
``-fd`` (finite-difference hypergradient), ``-frozen-emb`` (freeze_embeddings), ``-upper<K>``
(virtual step on the top K layers and the head only: virtual_from_layer = N-K+1), ``-dense-emb``
(the word embeddings' virtual step taken densely: ``Learner.row_sparse_embeddings = False``, i.e.
without change B of docs/performance.md), ``-reuse`` (``reuse_source_gradient``: theta's step
reuses the source gradient of the hypergradient), ``-fused`` (theta's AdamW with ``fused=True``).
``-proto`` and ``-sparse-emb`` are accepted and change nothing: they named the prototypes of
changes A and B, both now :class:`metaxl.meta.Learner`'s own code (the commands of
docs/performance.md that were measured before still run).

    python benchmarks/step_cost.py --model default --task ner --batch-size 10 --seq-len 64 \\
        --methods jt,jt-rtn,metaxl,metaxl-fd --json step_cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from metaxl.config import TrainConfig
from metaxl.meta import Batch, Learner, batch_loss, enable_gradient_checkpointing, split_batch
from metaxl.rtn import RTNInjector

BASES = ("jt-rtn", "jt", "metaxl", "target-only")  # jt-rtn before jt: prefix match
DEFAULT_METHODS = "jt,jt-rtn,metaxl,metaxl-fd"
# targets of the issue: (max time ratio, max memory ratio) to JT
TARGETS = {"exact": (2.5, 2.0), "finite-difference": (2.5, 1.3)}
NER_LABELS = 9  # MasakhaNER: O + B/I of PER, ORG, LOC, DATE
SA_LABELS = 2
MB = 1024 * 1024


# ---------------------------------------------------------------------------- methods
@dataclass
class Variant:
    name: str
    base: str
    fd: bool = False
    frozen_emb: bool = False
    upper: int | None = None
    dense_emb: bool = False
    reuse: bool = False
    fused: bool = False

    @property
    def hypergrad(self) -> str:
        return "finite-difference" if self.fd else "exact"


def parse_variant(name: str) -> Variant:
    """``metaxl-fd-frozen-emb`` -> Variant(base="metaxl", fd=True, frozen_emb=True).

    >>> parse_variant("metaxl-upper6").upper
    6
    >>> parse_variant("jt-rtn").base
    'jt-rtn'
    """
    for base in BASES:
        if name == base or name.startswith(base + "-"):
            break
    else:
        raise SystemExit(f"unknown method {name!r}: start with one of {', '.join(BASES)}")
    v = Variant(name=name, base=base)
    rest = name[len(base) :]
    while rest:
        if rest.startswith("-fd"):
            v.fd, rest = True, rest[3:]
        elif rest.startswith("-frozen-emb"):
            v.frozen_emb, rest = True, rest[len("-frozen-emb") :]
        elif rest.startswith("-proto"):  # change A, now Learner's own code
            rest = rest[len("-proto") :]
        elif rest.startswith("-fused"):
            v.fused, rest = True, rest[len("-fused") :]
        elif rest.startswith("-sparse-emb"):  # change B, now Learner's own code
            rest = rest[len("-sparse-emb") :]
        elif rest.startswith("-dense-emb"):
            v.dense_emb, rest = True, rest[len("-dense-emb") :]
        elif rest.startswith("-reuse"):
            v.reuse, rest = True, rest[len("-reuse") :]
        elif m := re.match(r"-upper(\d+)", rest):
            v.upper, rest = int(m.group(1)), rest[m.end() :]
        else:
            raise SystemExit(f"method {name!r}: unknown suffix {rest!r} "
                             "(use -fd, -frozen-emb, -upper<K>, -dense-emb, -reuse, -fused)")
    if (v.fd or v.upper is not None or v.dense_emb or v.reuse) and v.base != "metaxl":
        raise SystemExit(f"method {name!r}: -fd, -upper<K>, -dense-emb and -reuse only apply to metaxl")
    return v


# ---------------------------------------------------------------------------- memory
_LIBC: Any = None


def malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so RSS measures live memory."""
    global _LIBC
    gc.collect()
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", fh.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class CpuPeak:
    """Peak RSS between ``reset()`` and ``peak()``: a ~1 ms sampling thread plus the exact
    kernel high-water mark where it can be reset."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self.hwm_ok = _reset_hwm() and _hwm_bytes() is not None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            r = rss_bytes()
            if r > self._peak:
                self._peak = r
            time.sleep(self.interval)

    def reset(self) -> int:
        now = rss_bytes()
        self._peak = now
        if self.hwm_ok:
            _reset_hwm()
        return now

    def peak(self) -> int:
        p = max(self._peak, rss_bytes())
        if self.hwm_ok:
            p = max(p, _hwm_bytes() or 0)
        return p

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Meter:
    """Current memory and the peak since ``reset``: CUDA allocator or process RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = CpuPeak() if device.type == "cpu" else None

    @property
    def kind(self) -> str:
        if self.cpu is None:
            return "cuda max_memory_allocated"
        return "RSS (1 ms sampler" + (" + VmHWM)" if self.cpu.hwm_ok else ")")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def current(self) -> int:
        if self.cpu is None:
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes()

    def reset(self) -> int:
        """Release freed memory, reset the peak, return the current memory."""
        malloc_trim()
        if self.cpu is None:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        return self.cpu.reset()

    def peak(self) -> int:
        if self.cpu is None:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self.cpu.peak()

    def close(self) -> None:
        if self.cpu is not None:
            self.cpu.close()


# ---------------------------------------------------------------------------- model and data
def build_model(name: str, task: str) -> Any:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertForTokenClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
        XLMRobertaForTokenClassification,
    )

    num_labels = NER_LABELS if task == "ner" else SA_LABELS
    if name == "tiny":
        cfg = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512, num_labels=num_labels)
        return (BertForTokenClassification if task == "ner" else BertForSequenceClassification)(cfg)
    if name == "xlmr-base-random":
        cfg = XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                               num_labels=num_labels)
        cls = XLMRobertaForTokenClassification if task == "ner" else XLMRobertaForSequenceClassification
        return cls(cfg)
    from metaxl.models import load_model

    labels = [f"L{i}" for i in range(num_labels)]
    return load_model(name, task, labels)


def random_batch(n: int, seq_len: int, vocab: int, task: str, num_labels: int, gen: torch.Generator,
                 device: torch.device) -> Batch:
    ids = torch.randint(5, vocab, (n, seq_len), generator=gen)
    mask = torch.ones(n, seq_len, dtype=torch.long)
    if task == "ner":
        labels = torch.randint(0, num_labels, (n, seq_len), generator=gen)
        labels[:, 0] = -100  # <s> / [CLS]
    else:
        labels = torch.randint(0, num_labels, (n,), generator=gen)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(opt: torch.optim.Optimizer | None) -> int:
    if opt is None:
        return 0
    return sum(tensor_bytes(v for v in st.values() if torch.is_tensor(v)) for st in opt.state.values())


def make_adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, impl: str) -> torch.optim.AdamW:
    """AdamW as train.py builds it (``default``: torch's choice, the for-loop kernel on CPU), or
    with ``foreach=True`` / ``fused=True``."""
    kw: dict[str, Any] = {"foreach": True} if impl == "foreach" else {"fused": True} if impl == "fused" else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)


class _ConstSched:
    def step(self) -> None:
        pass


@dataclass
class Runner:
    variant: Variant
    learner: Learner
    embedding: torch.nn.Parameter
    injector: RTNInjector | None
    times: list[float] = field(default_factory=list)
    transient: list[int] = field(default_factory=list)
    absolute: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    error: str | None = None

    @contextlib.contextmanager
    def active(self) -> Any:
        """Embedding trainable or frozen as this method wants, for the duration of its step."""
        before = self.embedding.requires_grad
        self.embedding.requires_grad_(not self.variant.frozen_emb)
        try:
            yield
        finally:
            self.embedding.requires_grad_(before)

    def state_bytes(self) -> int:
        """This method's own optimiser state (its share when optimisers are shared)."""
        ps = [*self.learner.theta.values(), *self.learner.phi]
        total = 0
        for opt in (self.learner.opt_theta, self.learner.opt_phi):
            if opt is None:
                continue
            for p in ps:
                st = opt.state.get(p)
                if st:
                    total += tensor_bytes(v for v in st.values() if torch.is_tensor(v))
        return total


def make_runner(v: Variant, model: Any, args: argparse.Namespace, device: torch.device, autocast: Any,
                shared_opt: torch.optim.Optimizer | None, num_layers: int) -> Runner:
    vfl = 0 if v.upper is None else max(0, num_layers - v.upper + 1)
    cfg = TrainConfig(method=v.base, hypergrad=v.hypergrad, freeze_embeddings=v.frozen_emb, virtual_from_layer=vfl,
                      reuse_source_gradient=v.reuse,
                      lr=args.lr, meta_lr=args.meta_lr, batch_size=args.batch_size, rtn_layers=args.rtn_layers,
                      rtn_variant=args.rtn_variant, rtn_hidden=args.rtn_hidden, precision=args.precision,
                      gradient_checkpointing=args.gradient_checkpointing, source=["random"], target="random")
    cfg.validate()
    emb = model.get_input_embeddings().weight
    injector = None
    if v.base in ("jt-rtn", "metaxl"):
        injector = RTNInjector(model, cfg.rtn_layers, cfg.rtn_variant, cfg.rtn_hidden,
                               detach_input=cfg.rtn_detach).to(device)
    before = emb.requires_grad
    emb.requires_grad_(not v.frozen_emb)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        opt_theta = shared_opt or make_adamw(params, cfg.lr, cfg.weight_decay, "fused" if v.fused else args.adamw)
        opt_phi = None
        if injector is not None:
            phi_lr = cfg.lr if v.base == "jt-rtn" else cfg.meta_lr
            opt_phi = torch.optim.AdamW(injector.parameters(), lr=phi_lr, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
        learner = Learner(model, injector, cfg, opt_theta, _ConstSched(), opt_phi, _ConstSched(), autocast, scaler)
        learner.row_sparse_embeddings = not v.dense_emb
    finally:
        emb.requires_grad_(before)
    return Runner(v, learner, emb, injector)


# ---------------------------------------------------------------------------- phases
def phase_breakdown(r: Runner, src: Batch, tgt: Batch, meter: Meter) -> list[tuple[str, float, int, int]]:
    """One step of ``r``'s method, mirroring the joint computation of MetaXL's step (``L_train``
    differentiated as a whole, as meta.py did before it kept the target gradient: single process,
    no GradScaler, no reuse of the target gradient), timed by phase. Returns (phase, seconds, peak bytes in the phase above the step start, bytes held at
    its end above the step start)."""
    L = r.learner
    out: list[tuple[str, float, int, int]] = []
    start = meter.reset()
    t = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal t
        meter.sync()
        now = time.perf_counter()
        peak = meter.peak()
        held = meter.current()
        out.append((name, now - t, peak - start, held - start))
        if meter.cpu is None:  # peak per phase
            torch.cuda.reset_peak_memory_stats(meter.device)
        else:
            meter.cpu.reset()
        t = time.perf_counter()

    def theta_step(loss: torch.Tensor) -> None:
        params = list(L.theta.values())
        loss.backward(inputs=params)
        mark("backward into theta")
        torch.nn.utils.clip_grad_norm_(params, L.cfg.max_grad_norm)
        L.opt_theta.step()
        L.opt_theta.zero_grad(set_to_none=True)
        mark("clip + AdamW step + zero_grad")

    v = r.variant
    if v.base == "jt":
        loss = L.train_loss(src, 0, tgt, rtn=False)
        mark("L_train forward")
        theta_step(loss)
        return out
    if v.base != "metaxl":
        raise ValueError("phases: jt and metaxl only")
    tgt_h, meta = split_batch(tgt)
    names = L.virtual_names
    theta = [L.theta[n] for n in names]
    a = L.inner_lr()
    exact = v.hypergrad == "exact"
    with sdpa_kernel([SDPBackend.MATH]) if exact else contextlib.nullcontext():
        loss = L.train_loss(src, 0, tgt_h)
    mark("L_train forward" + (" (math attention)" if exact else ""))
    raw = torch.autograd.grad(loss, theta, create_graph=exact, allow_unused=True)
    g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(theta, raw, strict=True)]
    del raw
    mark("grad g = dL_train/dtheta" + (" (create_graph)" if exact else ""))
    g_avg = [gi.detach().clone() for gi in g]
    theta_prime = {n: (p.detach() - a * gi).requires_grad_() for n, p, gi in zip(names, theta, g_avg, strict=True)}
    mark("clone g, theta' = theta - a g")
    with L.autocast():
        meta_loss = batch_loss(L.model, meta, theta_prime)
    mark("L_meta forward at theta'")
    raw = torch.autograd.grad(meta_loss, list(theta_prime.values()), allow_unused=True)
    g_meta = [torch.zeros_like(p) if gm is None else gm.detach() for p, gm in zip(theta, raw, strict=True)]
    del raw
    mark("grad g' = dL_meta/dtheta'")
    if exact:
        proxy = torch.stack([(gi * gm).sum() for gi, gm in zip(g, g_meta, strict=True)]).sum()
        grads = torch.autograd.grad(proxy, L.phi, allow_unused=True)
        phi_grads = [torch.zeros_like(p) if d is None else -a * d for p, d in zip(L.phi, grads, strict=True)]
        del g, loss, proxy
        mark("second-order backward into phi")
    else:
        del g, loss
        norm = torch.stack([(gm.float() ** 2).sum() for gm in g_meta]).sum().sqrt()
        eps = L.cfg.fd_epsilon / max(float(norm), 1e-12)
        pair = []
        for sign in (1.0, -1.0):
            shifted = {n: p.detach() + sign * eps * gm for n, p, gm in zip(names, theta, g_meta, strict=True)}
            loss_s = L.train_loss(src, 0, tgt_h, params=shifted)
            pair.append(torch.autograd.grad(loss_s, L.phi, allow_unused=True))
            del shifted, loss_s
        phi_grads = [-a * ((gp if gp is not None else 0) - (gn if gn is not None else 0)) / (2 * eps)
                     for gp, gn in zip(*pair, strict=True)]
        mark("finite differences: 2 x (L_train forward + phi grad)")
    del theta_prime, g_avg, g_meta, meta_loss
    for p, d in zip(L.phi, phi_grads, strict=True):
        p.grad = torch.as_tensor(d).to(p.dtype).expand_as(p).clone()
    L.opt_phi.step()
    L.opt_phi.zero_grad(set_to_none=True)
    mark("phi step (free theta', g, g')")
    loss = L.train_loss(src, 0, tgt_h)
    mark("L_train forward again (new phi)")
    theta_step(loss)
    return out


def profile_step(r: Runner, src: Batch, tgt: Batch, device: torch.device, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with r.active(), profile(activities=acts) as prof:
        r.learner.step(src, 0, tgt)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active, forward and backward (the autograd
    engine runs under the mode too). View and metadata operators launch no kernel and are counted
    apart, so ``ops`` approximates the kernel launches of a step on a GPU, where the paper's batch
    sizes make a step cost about its number of launches (docs/performance.md): a device-free
    predictor of the GPU time ratio.

    >>> x = torch.ones(3, requires_grad=True)
    >>> with OpCounter() as c:
    ...     (x * 2).sum().backward()
    >>> c.ops >= 3, c.views >= 0
    (True, True)
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.views = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.is_view or func.overloadpacket in _NO_KERNEL:
            self.views += 1
        else:
            self.ops += 1
        return func(*args, **(kwargs or {}))


_NO_KERNEL = {torch.ops.aten.detach, torch.ops.aten.t, torch.ops.aten.view, torch.ops.aten._unsafe_view,
              torch.ops.aten.expand, torch.ops.aten.alias, torch.ops.aten.lift_fresh, torch.ops.aten.empty,
              torch.ops.aten.empty_like, torch.ops.aten.empty_strided, torch.ops.aten.as_strided,
              torch.ops.aten._local_scalar_dense, torch.ops.aten.is_same_size}


def count_ops(r: Runner, src: Batch, tgt: Batch) -> tuple[int, int]:
    """(kernel-launching ops, view/metadata ops) of one step of ``r``'s method."""
    with r.active(), OpCounter() as counter:
        r.learner.step(src, 0, tgt)
    return counter.ops, counter.views


# ---------------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers

    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})",
    }
    with contextlib.suppress(OSError):
        info["loadavg_start"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with contextlib.suppress(OSError):
        m = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        if m:
            info["ram_gb"] = round(int(m.group(1)) / 1024 / 1024, 1)
    return info


def parse_with_machine_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add --threads, --device and --json (as the companion scripts, eval_cost.py and train_batching.py,
    take them) to a companion script's parser, parse its arguments and apply --threads."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def machine_fields(device: torch.device) -> dict[str, Any]:
    """The machine as the companion scripts record it (a subset of :func:`machine_info`)."""
    info = machine_info(device)
    return {"machine": info["device_name"], "cores": info["cores"], "torch_threads": info["torch_threads"],
            "torch": info["torch"], "transformers": info["transformers"]}


def machine_line(res: dict[str, Any]) -> str:
    """First line of a companion script's report, from :func:`machine_fields`' keys."""
    return f"machine: {res['machine']}; {res['cores']} cores ({res['torch_threads']} torch threads); torch {res['torch']}"


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="default | tiny | xlmr-base-random | a local checkpoint folder")
    p.add_argument("--task", choices=("ner", "sa"), default="ner")
    p.add_argument("--batch-size", type=int, default=10, help="source batch and target batch size")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="measured rounds (one step of every method each)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list; base jt|jt-rtn|metaxl|target-only + -fd, -frozen-emb, -upper<K>, -dense-emb, -reuse, -fused")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--meta-lr", type=float, default=1e-6)
    p.add_argument("--rtn-layers", default="-1", help="comma list (default: the last layer)")
    p.add_argument("--rtn-variant", default="gated", choices=("gated", "plain"))
    p.add_argument("--rtn-hidden", type=int, default=192)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--share-optimizer", action="store_true",
                   help="one AdamW over the model for all methods (saves RAM for big models; same work per step)")
    p.add_argument("--adamw", choices=("default", "foreach", "fused"), default="default",
                   help="theta's AdamW kernel (default: as train.py, torch's choice)")
    p.add_argument("--phases", action="store_true", help="also time the phases of one jt and metaxl step")
    p.add_argument("--phase-steps", type=int, default=2, help="steps per method for --phases (median)")
    p.add_argument("--count-ops", action="store_true",
                   help="also count the aten ops of one step per method (kernel launches on a GPU)")
    p.add_argument("--profile", default=None, help="comma list of methods to run one torch.profiler step of")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.rtn_layers = [int(x) for x in args.rtn_layers.split(",") if x.strip()]
    if args.batch_size < 2:
        p.error("--batch-size must be >= 2 (MetaXL splits the target batch in halves)")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    from metaxl.train import autocast_factory

    autocast: Callable[[], Any] = autocast_factory(device, args.precision)
    variants = [parse_variant(m.strip()) for m in args.methods.split(",") if m.strip()]
    if "jt" not in [v.name for v in variants]:
        variants.insert(0, parse_variant("jt"))  # the reference

    torch.manual_seed(args.seed)
    meter = Meter(device)
    machine = machine_info(device)
    malloc_trim()
    baseline = meter.current()
    log(f"machine: {machine['device_name']}, {machine['cores']} cores, torch {machine['torch']}")
    log(f"building model {args.model} ({args.task}) ...")
    t0 = time.perf_counter()
    model = build_model(args.model, args.task).to(device)
    model.train()
    config = model.config
    num_layers = int(config.num_hidden_layers)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    num_labels = NER_LABELS if args.task == "ner" else SA_LABELS
    weights = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    emb_bytes = tensor_bytes([model.get_input_embeddings().weight])
    n_params = sum(p.numel() for p in model.parameters())
    log(f"  {n_params / 1e6:.1f}M parameters ({emb_bytes / MB:.0f} MB word embeddings), "
        f"{num_layers} layers, hidden {config.hidden_size}, vocab {vocab} [{time.perf_counter() - t0:.1f}s]")

    shared = None
    if args.share_optimizer:
        shared = make_adamw([p for p in model.parameters() if p.requires_grad], args.lr, 0.0, args.adamw)
    runners = [make_runner(v, model, args, device, autocast, shared, num_layers) for v in variants]
    if args.gradient_checkpointing:  # after the RTN hooks: the replay in backward must see their state
        enable_gradient_checkpointing(model, [r.injector for r in runners if r.injector is not None])
    gen = torch.Generator().manual_seed(args.seed + 1)

    rounds = args.warmup + args.steps
    for rnd in range(rounds):
        src = random_batch(args.batch_size, args.seq_len, vocab, args.task, num_labels, gen, device)
        tgt = random_batch(args.batch_size, args.seq_len, vocab, args.task, num_labels, gen, device)
        measured = rnd >= args.warmup
        parts = []
        k = rnd % len(runners)  # rotate the order so no method always follows the same one
        for r in runners[k:] + runners[:k]:
            if r.error:
                continue
            before = meter.reset()
            t = time.perf_counter()
            try:
                with r.active():
                    stats = r.learner.step(src, 0, tgt)
            except (RuntimeError, torch.OutOfMemoryError) as err:  # keep the other methods going
                r.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                log(f"  {r.variant.name} failed: {r.error}")
                continue
            meter.sync()
            dt = time.perf_counter() - t
            peak = meter.peak()
            if measured:
                r.times.append(dt)
                r.transient.append(peak - before)
                r.absolute.append(peak)
                r.losses.append(stats.loss)
            parts.append(f"{r.variant.name} {dt:.2f}s {(peak - before) / MB:.0f}MB")
        label = f"round {rnd + 1}/{rounds}" + ("" if measured else " (warm-up)")
        log(f"{label}: " + ", ".join(parts))

    # ---------------------------------------------------------------- results
    results: dict[str, Any] = {
        "machine": machine, "memory_measure": meter.kind,
        "args": {k: v for k, v in vars(args).items()},
        "model": {"name": args.model, "class": type(model).__name__, "params": n_params, "layers": num_layers,
                  "hidden": int(config.hidden_size), "vocab": vocab, "weights_mb": weights / MB,
                  "word_embeddings_mb": emb_bytes / MB},
        "baseline_mb": baseline / MB, "methods": {}, "targets": [],
    }
    for r in runners:
        row: dict[str, Any] = {"base": r.variant.base, "hypergrad": r.variant.hypergrad if r.variant.base == "metaxl"
                               else None, "frozen_embeddings": r.variant.frozen_emb,
                               "virtual_from_layer": r.learner.cfg.virtual_from_layer, "dense_embedding_step": r.variant.dense_emb,
                               "error": r.error}
        if r.times:
            state = r.state_bytes() + tensor_bytes(r.learner.phi)
            row.update(
                times_s=r.times, median_s=statistics.median(r.times),
                step_mb=statistics.median(r.transient) / MB,
                optimizer_state_mb=state / MB,
                peak_mb=(weights + state + statistics.median(r.transient)) / MB,
                abs_peak_mb=max(r.absolute) / MB, above_baseline_mb=(max(r.absolute) - baseline) / MB,
                loss=statistics.mean(r.losses),
            )
        results["methods"][r.variant.name] = row
    ref_row = results["methods"]["jt"]
    for row in results["methods"].values():
        if "median_s" in row and "median_s" in ref_row:
            row["time_ratio"] = row["median_s"] / ref_row["median_s"]
            if len(row["times_s"]) == len(ref_row["times_s"]):  # same rounds: the paired ratio
                row["time_ratio_paired"] = statistics.median(
                    t / t_ref for t, t_ref in zip(row["times_s"], ref_row["times_s"], strict=True))
            row["mem_ratio"] = row["peak_mb"] / ref_row["peak_mb"]
            row["step_mem_ratio"] = row["step_mb"] / ref_row["step_mb"] if ref_row["step_mb"] > 0 else None
    for name, row in results["methods"].items():
        if row["base"] != "metaxl" or "time_ratio" not in row:
            continue
        max_t, max_m = TARGETS[row["hypergrad"]]
        results["targets"].append({
            "method": name, "hypergrad": row["hypergrad"], "time_ratio_paired": row.get("time_ratio_paired"),
            "time_ratio": row["time_ratio"], "time_target": max_t, "time_pass": row["time_ratio"] <= max_t,
            "mem_ratio": row["mem_ratio"], "mem_target": max_m, "mem_pass": row["mem_ratio"] <= max_m,
        })

    if args.phases:
        results["phases"] = {}
        for r in runners:
            if r.variant.base not in ("jt", "metaxl") or r.variant.dense_emb or r.error:
                continue
            log(f"phases: {r.variant.name} ...")
            runs = []
            for _ in range(args.phase_steps):
                src = random_batch(args.batch_size, args.seq_len, vocab, args.task, num_labels, gen, device)
                tgt = random_batch(args.batch_size, args.seq_len, vocab, args.task, num_labels, gen, device)
                with r.active():
                    runs.append(phase_breakdown(r, src, tgt, meter))
            results["phases"][r.variant.name] = [
                {"phase": runs[0][i][0], "median_s": statistics.median(run[i][1] for run in runs),
                 "peak_mb": max(run[i][2] for run in runs) / MB, "held_mb": runs[-1][i][3] / MB}
                for i in range(len(runs[0]))
            ]
    if args.count_ops:
        log("counting the ops of one step per method ...")
        src = random_batch(args.batch_size, args.seq_len, vocab, args.task, num_labels, gen, device)
        tgt = random_batch(args.batch_size, args.seq_len, vocab, args.task, num_labels, gen, device)
        for r in runners:
            if not r.error:
                ops, views = count_ops(r, src, tgt)
                results["methods"][r.variant.name].update(ops=ops, view_ops=views)
        jt_ops = results["methods"]["jt"].get("ops")
        for row in results["methods"].values():
            if jt_ops and "ops" in row:
                row["ops_ratio"] = row["ops"] / jt_ops
    if args.profile:
        results["profile"] = {}
        for name in [m.strip() for m in args.profile.split(",") if m.strip()]:
            r = next((x for x in runners if x.variant.name == name), None)
            if r is None or r.error:
                continue
            log(f"profiling one {name} step ...")
            src = random_batch(args.batch_size, args.seq_len, vocab, args.task, num_labels, gen, device)
            tgt = random_batch(args.batch_size, args.seq_len, vocab, args.task, num_labels, gen, device)
            results["profile"][name] = profile_step(r, src, tgt, device, args.profile_rows)
    with contextlib.suppress(OSError):
        results["machine"]["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    meter.close()
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        log(f"wrote {args.json}")
    return results


def report(res: dict[str, Any]) -> str:
    m, mod, a = res["machine"], res["model"], res["args"]
    lines = [
        f"machine: {m['device_name']}; {m['cores']} cores ({m['torch_threads']} torch threads); "
        f"torch {m['torch']}, transformers {m['transformers']}; load avg {m.get('loadavg_start')} -> "
        f"{m.get('loadavg_end')}",
        f"model: {mod['name']} ({mod['class']}, {mod['params'] / 1e6:.1f}M params, {mod['layers']} layers, hidden "
        f"{mod['hidden']}, vocab {mod['vocab']}; weights {mod['weights_mb']:.0f} MB, word embeddings "
        f"{mod['word_embeddings_mb']:.0f} MB)",
        f"task {a['task']}, batch {a['batch_size']} source + {a['batch_size']} target, seq len {a['seq_len']}, "
        f"{a['precision']}{', gradient checkpointing' if a['gradient_checkpointing'] else ''}, AdamW {a['adamw']}"
        f"{' (shared)' if a['share_optimizer'] else ''}; {a['steps']} measured "
        f"rounds after {a['warmup']} warm-up, interleaved; memory: {res['memory_measure']}",
        "",
    ]
    header = ["method", "s/step", "x JT", "paired", "peak MB", "x JT", "step MB", "x JT", "abs MB", "+base MB"]
    rows = []
    for name, r in res["methods"].items():
        if "median_s" not in r:
            rows.append([name, "failed", "", "", "", "", "", "", "", (r.get("error") or "")[:60]])
            continue
        smr = r.get("step_mem_ratio")
        paired = r.get("time_ratio_paired")
        rows.append([name, f"{r['median_s']:.3f}", f"{r['time_ratio']:.2f}",
                     "-" if paired is None else f"{paired:.2f}", f"{r['peak_mb']:.0f}",
                     f"{r['mem_ratio']:.2f}", f"{r['step_mb']:.0f}", "-" if smr is None else f"{smr:.2f}",
                     f"{r['abs_peak_mb']:.0f}", f"{r['above_baseline_mb']:.0f}"])
    lines.append(fmt_table(header, rows))
    lines.append("")
    lines.append("s/step: median; x JT: ratio of medians; paired: median over rounds of the ratio to JT's step "
                 "in the same round")
    lines.append("peak MB = weights + own optimiser state + step MB (the step's peak above the memory held "
                 "before it); abs MB = process peak; +base MB = above the RSS before the model was built "
                 "(includes every method's optimiser state)")
    for t in res["targets"]:
        lines.append(
            f"target {t['method']:<24} time {t['time_ratio']:.2f}x <= {t['time_target']}x "
            f"{'PASS' if t['time_pass'] else 'MISS'}"
            + ("" if t.get("time_ratio_paired") is None else f" (paired {t['time_ratio_paired']:.2f}x)")
            + f";  memory {t['mem_ratio']:.2f}x <= {t['mem_target']}x "
            f"{'PASS' if t['mem_pass'] else 'MISS'}")
    counted = [(name, r) for name, r in res["methods"].items() if "ops" in r]
    if counted:
        lines.append("")
        lines.append("ops of one step (aten operators that launch a kernel; views and metadata apart):")
        lines.append(fmt_table(["method", "ops", "x JT", "views"], [
            [name, str(r["ops"]), f"{r.get('ops_ratio', float('nan')):.2f}", str(r["view_ops"])]
            for name, r in counted]))
    for name, phases in res.get("phases", {}).items():
        total = sum(p["median_s"] for p in phases)
        lines.append("")
        lines.append(f"phases of one {name} step (median of {a['phase_steps']}; total {total:.3f}s):")
        lines.append(fmt_table(["phase", "s", "%", "peak MB", "held MB"], [
            [p["phase"], f"{p['median_s']:.3f}", f"{100 * p['median_s'] / total:.0f}", f"{p['peak_mb']:.0f}",
             f"{p['held_mb']:.0f}"] for p in phases]))
    for name, table in res.get("profile", {}).items():
        lines.append("")
        lines.append(f"torch.profiler, one {name} step:")
        lines.append(table)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
