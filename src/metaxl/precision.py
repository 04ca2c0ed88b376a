"""Mixed precision: which autocast a run uses, and bf16 on the CPU.

``--precision bf16`` runs every forward under ``torch.autocast(device, dtype=torch.bfloat16)``, on
a CUDA GPU and on the CPU alike, for every method: target-only, JT, JT+RTN and MetaXL, whose
exact hypergradient differentiates twice through the autocast graph and whose finite-difference
mode runs its two shifted forwards under it too. What stays fp32, and why:

- the parameters, their gradients and the optimiser state (AdamW moments): autocast casts a
  weight to bf16 per operation and the gradient comes back in the weight's dtype, fp32; a bf16
  master copy would lose updates smaller than 2**-8 of the weight (lr 1e-4 steps would vanish);
- the losses: cross-entropy is on autocast's fp32 list on both devices (the logits are rounded to
  bf16, the log-softmax and the mean are not), and every loss is summed and reported in fp32;
- the virtual step ``theta' = theta - a g``, ``g'`` and the mixed second-order product's
  cotangents: they are fp32 tensors, computed outside autocast (only matrix products and
  attention inside the forwards run in bf16, on either side of the double backward). The
  hypergradient then agrees with the fp32 exact value to a cosine of 0.99 or more on the test
  suite's tiny model (``tests/test_precision.py``); computing the mixed product in fp32 would need
  an fp32 replay of the source forward and give back most of the speed.

On the CPU, bf16 matrix products are fast only where the processor has bf16 instructions: x86's
``avx512_bf16`` or ``amx_bf16`` (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later),
Arm's ``bf16``. Without them torch converts to fp32 and back around every product, and a bf16 run is
slower than fp32: :func:`autocast_factory` warns, naming the flags it looked for.

>>> import torch
>>> ctx = autocast_factory(torch.device("cpu"), "fp32")
>>> with ctx():
...     torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype
torch.float32
>>> ctx = autocast_factory(torch.device("cpu"), "bf16", check=lambda: None)
>>> with ctx():
...     torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype
torch.bfloat16
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU flags (``/proc/cpuinfo`` ``flags`` on x86, ``Features`` on Arm) that mean bf16 instructions."""


class PrecisionWarning(UserWarning):
    """A precision setting that will run, but slower or less accurately than the user may expect."""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags from ``cpuinfo`` (Linux), or None where they cannot be read.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "cpuinfo"
    >>> _ = p.write_text("processor : 0\\nflags : fpu sse avx512f amx_bf16\\n\\nprocessor : 1\\n")
    >>> sorted(cpu_flags(p))
    ['amx_bf16', 'avx512f', 'fpu', 'sse']
    >>> cpu_flags("/nonexistent/cpuinfo") is None
    True
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def cpu_bf16_flags() -> list[str] | None:
    """The bf16 flags this CPU has (``[]``: none, a bf16 run will be slow), or None where it
    cannot be told (no ``/proc/cpuinfo``: macOS, Windows).

    >>> flags = cpu_bf16_flags()
    >>> flags is None or set(flags) <= set(BF16_FLAGS)
    True
    """
    flags = cpu_flags()
    if flags is None:
        return None
    return [f for f in BF16_FLAGS if f in flags]


def bf16_cpu_note(flags: list[str] | None = None) -> str | None:
    """The one-line warning for ``--precision bf16`` on a CPU without bf16 instructions, else None.

    >>> bf16_cpu_note(["amx_bf16"]) is None
    True
    >>> print(bf16_cpu_note([]))  # doctest: +NORMALIZE_WHITESPACE
    --precision bf16 on a CPU without bf16 instructions (none of avx512_bf16, amx_bf16, bf16 in
    /proc/cpuinfo): torch emulates bf16 and the run will be slower than fp32; use --precision fp32 on this machine
    """
    if flags is None:
        flags = cpu_bf16_flags()
    if flags is None or flags:
        return None
    return (f"--precision bf16 on a CPU without bf16 instructions (none of {', '.join(BF16_FLAGS)} in "
            f"/proc/cpuinfo): torch emulates bf16 and the run will be slower than fp32; use --precision fp32 "
            f"on this machine")


def warn_if_slow_bf16() -> None:
    """Warn (:class:`PrecisionWarning`) when :func:`bf16_cpu_note` has something to say."""
    note = bf16_cpu_note()
    if note:
        warnings.warn(note, PrecisionWarning, stacklevel=3)


def autocast_factory(device: torch.device, precision: str,
                     check: Callable[[], None] | None = warn_if_slow_bf16) -> Callable[[], Any]:
    """A factory of the context in which the forwards of a run on ``device`` at ``precision`` run.

    fp32: no autocast. bf16: ``torch.autocast`` on CUDA or the CPU (``check`` runs once for the
    CPU: by default a warning where the CPU lacks bf16 instructions). fp16: CUDA only (its
    GradScaler is CUDA's; fp16 products on the CPU are not faster than fp32).
    """
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"--precision fp16 needs a CUDA device; on the {device.type} use --precision bf16 or fp32")
    if precision not in ("bf16", "fp16"):
        raise ConfigError(f"--precision {precision!r} is not valid; choose one of: fp32, bf16, fp16")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"--precision {precision} runs on cuda or cpu, not {device.type}; use --precision fp32")
    if device.type == "cpu" and check is not None:
        check()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    kind = device.type
    return lambda: torch.autocast(device_type=kind, dtype=dtype)


def describe_cpu() -> str:
    """A short description of the CPU's bf16 support, for reports.

    >>> isinstance(describe_cpu(), str)
    True
    """
    flags = cpu_bf16_flags()
    found = "unknown" if flags is None else (", ".join(flags) or "none")
    return f"{platform.machine()}, bf16 flags: {found}"
