"""Data-parallel training helpers: process-group setup from launcher env vars and batch sharding.

``torchrun --nproc_per_node N -m metaxl train ...`` (or ``accelerate launch``) starts N copies of
the training loop. Every copy draws the *same* global batches (same seed, same generator) and keeps
only its own contiguous shard (:func:`shard`); :mod:`metaxl.meta` averages every gradient across
the copies (theta's gradients, MetaXL's virtual-step gradient ``g`` and meta gradient ``g'``, and
phi's hypergradient), so one distributed step equals the single-process step on the global batch.
Only the main process (rank 0) evaluates and writes. See ``docs/distributed.md``.

Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) every helper is a cheap no-op:

>>> info = init_from_env()            # plain ``python -m metaxl train``
>>> info.world_size, info.rank, info.is_main
(1, 0, True)
>>> shard(list(range(10)), rank=1, world=3)
[4, 5, 6]
>>> [x for r in range(3) for x in shard(list(range(10)), r, 3)] == list(range(10))
True
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import ConfigError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 3600.0
"""Collective timeout: rank 0 evaluates dev/test while the others wait at the next collective."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node).

    ``owned`` is True when :func:`init_from_env` created the process group (so the caller should
    :func:`cleanup` it); ``backend`` is ``"nccl"``, ``"gloo"`` or None (single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True
    backend: str | None = None
    owned: bool = False

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1


def _ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def current() -> DistInfo:
    """The :class:`DistInfo` of an already initialised process group (single process otherwise)."""
    if not _ready():
        return DistInfo()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=_env_int("LOCAL_RANK", rank), is_main=rank == 0,
                    backend=str(torch.distributed.get_backend()))


def pick_backend(device: str | torch.device | None = None) -> str:
    """``nccl`` when the run uses CUDA, else ``gloo``; ``METAXL_DIST_BACKEND`` overrides.

    >>> pick_backend("cpu")
    'gloo'
    """
    forced = os.environ.get("METAXL_DIST_BACKEND")
    if forced:
        return forced
    kind = torch.device(device).type if device not in (None, "auto") else None  # type: ignore[arg-type]
    if kind == "cuda" or (kind is None and torch.cuda.is_available()):
        return "nccl"
    return "gloo"


def init_from_env(device: str | torch.device | None = None, timeout_s: float | None = None) -> DistInfo:
    """Initialise ``torch.distributed`` from the launcher's env vars and describe this process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` as set by
    ``torchrun`` and ``accelerate launch``. A no-op (single process) when ``WORLD_SIZE`` is absent
    or 1; idempotent when a process group already exists (then ``owned`` is False). With NCCL the
    current CUDA device is set to ``cuda:LOCAL_RANK`` first.

    Args:
        device: the run's ``--device`` (``auto``, ``cpu``, ``cuda``...): picks the backend.
        timeout_s: collective timeout (default :data:`DEFAULT_TIMEOUT_S`, or ``METAXL_DIST_TIMEOUT``).
    """
    if _ready():
        return current()
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if not torch.distributed.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    rank = _env_int("RANK", -1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise ConfigError(f"WORLD_SIZE={world} needs RANK in 0..{world - 1} (got {os.environ.get('RANK')!r}); "
                          "start the processes with torchrun or accelerate launch")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set; start the processes with "
                          "torchrun --nproc_per_node N -m metaxl train ... or accelerate launch -m metaxl train ...")
    backend = pick_backend(device)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("the nccl backend needs CUDA; use --device cpu (gloo) on a machine without GPUs")
        torch.cuda.set_device(local_rank % max(torch.cuda.device_count(), 1))
    if timeout_s is None:
        timeout_s = float(os.environ.get("METAXL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    torch.distributed.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, is_main=rank == 0, backend=backend,
                    owned=True)


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """Under data parallelism an index-less ``cuda`` means this process's GPU ``cuda:LOCAL_RANK``.

    >>> local_device(torch.device("cuda"), DistInfo(rank=1, world_size=2, local_rank=1, is_main=False))
    device(type='cuda', index=1)
    >>> local_device(torch.device("cpu"), DistInfo(rank=1, world_size=2, local_rank=1, is_main=False))
    device(type='cpu')
    """
    if info.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", info.local_rank)
    return device


def get_rank() -> int:
    return torch.distributed.get_rank() if _ready() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if _ready() else 1


def is_main() -> bool:
    """Rank 0 (or a single process). Falls back to ``RANK`` after :func:`cleanup`."""
    if _ready():
        return torch.distributed.get_rank() == 0
    return _env_int("RANK", 0) == 0


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if _ready():
        torch.distributed.barrier()


def cleanup() -> None:
    """Destroy the process group (no-op without one)."""
    if _ready():
        torch.distributed.destroy_process_group()


def _comm_device() -> torch.device:
    if _ready() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------- data sharding
def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous shard of ``n`` items: sizes differ by at most
    one, the first ``n % world`` ranks get the extra item.

    >>> [shard_bounds(10, r, 4) for r in range(4)]
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s contiguous part of a global batch; the shards in rank order concatenate to
    ``items``. Deterministic: every rank computes the same global batch and keeps its slice.

    >>> shard(["a", "b", "c", "d", "e"], 0, 2), shard(["a", "b", "c", "d", "e"], 1, 2)
    (['a', 'b', 'c'], ['d', 'e'])
    """
    start, stop = shard_bounds(len(items), rank, world)
    return list(items[start:stop])


def shard_batch(batch: Mapping[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """:func:`shard` for a collated batch: every tensor sliced along dim 0.

    >>> b = {"input_ids": torch.arange(8).view(4, 2)}
    >>> shard_batch(b, 1, 2)["input_ids"].tolist()
    [[4, 5], [6, 7]]
    """
    n = next(iter(batch.values())).shape[0]
    start, stop = shard_bounds(n, rank, world)
    return {k: v[start:stop] for k, v in batch.items()}


def even_split(n: int, world: int) -> bool:
    """True when ``n`` items give every rank the same number (>= 1): then the average of the ranks'
    mean losses is exactly the global mean loss (per-example losses; see docs/distributed.md).

    >>> even_split(8, 2), even_split(7, 2), even_split(1, 2)
    (True, False, False)
    """
    return n >= world and n % world == 0


# ---------------------------------------------------------------------------- identical start
@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers into every process (in place), so all ranks start from
    identical weights (the task head and the RTNs are randomly initialised). No-op single process."""
    if not _ready() or torch.distributed.get_world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        torch.distributed.broadcast(t.data, src=src)


def broadcast_object(obj: T, src: int = 0) -> T:
    """``src``'s picklable ``obj`` on every process (e.g. the results dict at the end of training)."""
    if not _ready() or torch.distributed.get_world_size() == 1:
        return obj
    box: list[Any] = [obj]
    torch.distributed.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]  # type: ignore[no-any-return]


def all_mean(value: float) -> float:
    """The mean of a float over processes (for logged losses, and for decisions every rank must take
    alike, such as stopping on a non-finite loss). No-op single process."""
    if not _ready() or torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return float(t.item()) / torch.distributed.get_world_size()


def set_rank_seed(seed: int, info: DistInfo) -> None:
    """Reseed the *global* RNGs per rank (dropout masks must differ between the shards of a batch).

    Call after the model and RTNs are built and broadcast. A no-op in a single process, so a
    one-process run is unchanged. The data order uses its own ``torch.Generator``, seeded alike on
    every rank, and is not affected.
    """
    if not info.enabled:
        return
    seed = seed + 1_000_003 * info.rank
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


__all__ = [
    "DistInfo", "init_from_env", "current", "pick_backend", "local_device", "get_rank", "get_world_size",
    "is_main", "barrier", "cleanup", "shard_bounds", "shard", "shard_batch", "even_split",
    "broadcast_module", "broadcast_object", "all_mean", "set_rank_seed",
]
