"""Guards of the training loop: divergence, resume, output folders and disk space.

Everything here turns a failure that used to end in a traceback or a silently wrong result into
one clear :class:`~metaxl.errors.MetaXLError` (the CLI prints it on one line), and keeps what is on
disk valid: JSON without bare ``NaN``, files written to a temporary name, synced and renamed.

>>> json_safe({"loss": float("nan"), "f1": [1.5, float("inf")]})
{'loss': None, 'f1': [1.5, None]}
>>> config_differences({"lr": 1e-3, "method": "metaxl", "progress": True},
...                    {"lr": 1e-3, "method": "jt", "progress": False})
['method: metaxl -> jt']
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, MetaXLError

RUNTIME_KEYS = frozenset({"progress", "device", "output_dir", "data_dir", "save_state", "save_checkpoint",
                          "eval_batch_size", "on_nonfinite", "diagnostics_every"})
"""Config keys that may change between an interrupted run and its ``--resume``: they do not
change what is trained (where it runs, what is shown or saved, where the data lies)."""


class Diverged(MetaXLError):
    """Training produced a non-finite loss, hypergradient or weight."""


class DiskError(MetaXLError):
    """An output file could not be written (disk full, read-only, not a folder)."""


# ---------------------------------------------------------------------------- JSON
def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def os_error(err: OSError, path: Path | str, what: str) -> DiskError:
    """One line for an operating-system error while writing ``path``.

    >>> print(os_error(OSError(errno.ENOSPC, "No space left on device"), "runs/x/checkpoint", "the checkpoint"))
    runs/x/checkpoint: no space left on the device while writing the checkpoint; free some space (or use another --output-dir) and run again
    """
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        hint = "no space left on the device while writing {what}; free some space (or use another --output-dir) and run again"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "permission denied while writing {what}; choose a folder you can write to"
    elif code == errno.ENOTDIR:
        hint = "a part of this path is a file, not a folder; choose another location"
    elif code == errno.EISDIR:
        hint = "is a folder; give a file name"
    else:
        hint = f"could not write {{what}} ({err.strerror or err}); check the location"
    return DiskError(f"{path}: " + hint.format(what=what))


def write_bytes_atomic(path: Path, data: bytes, what: str = "the file") -> None:
    """Write ``data`` to ``path`` through ``path.tmp``: synced, then renamed over ``path``; an
    error (disk full, ...) removes the temporary file and leaves the previous ``path`` intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with _quiet():
            tmp.unlink()
        raise os_error(err, path, what) from None


def write_json_atomic(path: Path, data: Any, what: str = "results.json") -> None:
    """``data`` as JSON (no bare NaN: non-finite floats become null), written atomically."""
    text = json.dumps(json_safe(data), indent=2, default=str, allow_nan=False)
    write_bytes_atomic(path, text.encode("utf-8"), what)


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)


# ---------------------------------------------------------------------------- folders and space
def check_output_dir(out: Path) -> None:
    """Raise a one-line error unless ``out`` is (or can be made) a writable folder.

    Checked before anything is written, so a bad ``--output-dir`` fails fast and leaves nothing.
    """
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise DiskError(f"--output-dir {out}: {parent} is a file, not a folder; choose another --output-dir")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise DiskError(f"--output-dir {out}: {parent} is not writable; choose a folder you can write to")
            return


def ensure_space(folder: Path, need: int, what: str) -> None:
    """Raise before writing ``what`` (about ``need`` bytes) when ``folder``'s disk has less free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell: the write itself reports a full disk
    if free < need:
        raise DiskError(f"{folder}: {what} needs about {_mb(need)} but only {_mb(free)} is free on that disk; "
                        "free some space (or use another --output-dir) and run again")


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def model_bytes(*modules: Any) -> int:
    """The bytes of every parameter and buffer of ``modules`` (the size of a saved checkpoint)."""
    total = 0
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            total += t.numel() * t.element_size()
    return total


def save_dir_atomic(path: Path, write: Callable[[Path], None], what: str) -> None:
    """Fill ``path.tmp`` with ``write`` and swap it for ``path``: ``path`` is the old folder or the
    new one at every moment (``path.old`` holds the old one during the swap; :func:`recover_dir`
    puts it back after a kill). An OS error removes the temporary folder, keeps the old ``path``
    and raises one line."""
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        tmp.rename(path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(path)
        raise os_error(err, path, what) from None
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: Path) -> None:
    """After a kill during :func:`save_dir_atomic`: the old folder back, the half-written one gone."""
    old = path.with_name(path.name + ".old")
    if old.is_dir() and not path.exists():
        old.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(path.with_name(path.name + ".tmp"), ignore_errors=True)


# ---------------------------------------------------------------------------- resume
def config_differences(saved: dict[str, Any], now: dict[str, Any],
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """``key: old -> new`` for every training key whose value differs (runtime keys excepted).

    A key the saved config lacks (written by an older metaxl) counts as its default.
    """
    defaults = defaults or {}
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in RUNTIME_KEYS:
            continue
        old = saved.get(key, defaults.get(key))
        new = now.get(key, defaults.get(key))
        if json_safe(old) != json_safe(new) and not _same_number(old, new):
            out.append(f"{key}: {old} -> {new}")
    return out


def _same_number(a: Any, b: Any) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)


def read_previous_results(out: Path) -> dict[str, Any] | None:
    """The ``results.json`` of an earlier run in ``out`` (None when there is none or it is not ours)."""
    path = out / "results.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("config"), dict) else None


def check_resume(out: Path, config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """For ``--resume``: the finished run's results (nothing to do), None to go on, or a one-line
    error naming the keys that differ from the interrupted run's config."""
    prev = read_previous_results(out)
    if prev is None:
        return None
    diff = config_differences(prev["config"], config, defaults)
    if diff:
        raise ConfigError(
            f"{out / 'results.json'}: --resume with a different config than the run in this folder "
            f"({'; '.join(diff)}); use the same flags to resume, or another --output-dir for a new run"
        )
    return prev if prev.get("status") == "finished" else None


# ---------------------------------------------------------------------------- divergence
def all_finite(tensors: Iterable[Any]) -> bool:
    """True when every element of ``tensors`` is finite (one device synchronisation in all).

    >>> import torch
    >>> all_finite([torch.ones(3), torch.zeros(2)]), all_finite([torch.tensor([1.0, float("nan")])])
    (True, False)
    """
    import torch

    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def step_problem(loss: float, phi_grad_norm: float | None, params: Iterable[Any], precision: str) -> str | None:
    """What is non-finite after a training step, or None.

    >>> import torch
    >>> step_problem(0.5, None, [torch.ones(2)], "fp32") is None
    True
    >>> step_problem(float("nan"), None, [torch.ones(2)], "fp32")
    'the training loss is nan'
    """
    if not math.isfinite(loss):
        return f"the training loss is {loss}"
    # under fp16 an overflowing hypergradient is the loss scaler's business (its step is skipped)
    if phi_grad_norm is not None and not math.isfinite(phi_grad_norm) and precision != "fp16":
        return "the hypergradient (the RTN's gradient) is not finite"
    return weight_problem(params)


EXPLODED = 1e12
"""A weight larger than this in absolute value has exploded (trained weights stay well below 1e3);
the next forward pass overflows, or evaluation gives meaningless scores."""


def weight_problem(params: Iterable[Any]) -> str | None:
    """None, or what is wrong with the weights: not finite, or exploded (one synchronisation).

    >>> import torch
    >>> weight_problem([torch.ones(2)]) is None, weight_problem([torch.tensor([1e30])])
    (True, 'the weights exploded after the update (|w| up to 1e+30)')
    """
    import torch

    # aminmax reads each weight once and allocates nothing (|t|.max() wrote a copy of every weight)
    ends = [torch.aminmax(t.detach()) for t in params if t.numel()]
    if not ends:
        return None
    peak = float(torch.stack([torch.maximum(-lo, hi).float() for lo, hi in ends]).max())
    if not math.isfinite(peak):
        return "the weights are not finite after the update"
    if peak > EXPLODED:
        return f"the weights exploded after the update (|w| up to {peak:.0e})"
    return None


def divergence_message(problem: str, epoch: int, step: int, cfg: Any) -> str:
    cause = (f"the learning rate is likely too high (--lr {cfg.lr:g}"
             + (f", --meta-lr {cfg.meta_lr:g}" if cfg.method == "metaxl" else "") + "); lower it")
    if "hypergradient" in problem:
        cause = f"the meta learning rate is likely too high (--meta-lr {cfg.meta_lr:g}); lower it"
    return (f"training diverged at epoch {epoch}, step {step}: {problem}; {cause}, "
            "or pass --on-nonfinite skip to skip such steps")


@dataclass
class StepUndo:
    """A copy of everything a step changes, to undo a non-finite step (``--on-nonfinite skip``)."""

    tensors: list[Any]
    copies: list[Any]
    states: list[tuple[Any, dict[str, Any]]]

    @classmethod
    def take(cls, modules: Iterable[Any], stateful: Iterable[Any]) -> StepUndo:
        import copy

        tensors = [t for m in modules if m is not None for t in list(m.parameters()) + list(m.buffers())]
        states = [(o, copy.deepcopy(o.state_dict())) for o in stateful if o is not None]
        return cls(tensors, [t.detach().clone() for t in tensors], states)

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for t, c in zip(self.tensors, self.copies, strict=True):
                t.copy_(c)
        for obj, state in self.states:
            obj.load_state_dict(state)




# ---------------------------------------------------------------------------- user files
def yaml_error(path: Path, err: Exception) -> str:
    """One line for a YAML syntax error: the file, the line and what to do."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{where}: not valid YAML ({problem}); fix the syntax (key: value per line)"


def read_yaml_text(path: Path, what: str) -> str:
    """The text of a YAML file, or a one-line error (missing, a folder, not UTF-8, unreadable)."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give the YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}; check the path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror}); check the file and its permissions") from None


# ---------------------------------------------------------------------------- evaluate / predict inputs
def decode_input(raw: bytes, where: str) -> str:
    """``raw`` as UTF-8 text (a byte-order mark dropped), or a one-line error with the line.

    >>> decode_input(b"\\xef\\xbb\\xbfamina\\n", "in.txt")
    'amina\\n'
    >>> decode_input(b"ok\\nbad \\xff\\n", "in.txt")
    Traceback (most recent call last):
    metaxl.errors.DataError: in.txt:2: not UTF-8 text (byte 0xff at column 5); save the input as UTF-8 (e.g. iconv -f latin1 -t utf-8)
    """
    from .errors import DataError

    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        col = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{where}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {col}); "
                        "save the input as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def check_loaded_model(loaded: Any, where: str) -> None:
    """Warn (stderr) when a checkpoint's weights are not finite: its predictions mean nothing."""
    import sys

    if not all_finite(loaded.model.parameters()):
        print(f"metaxl: warning: {where} has non-finite weights (NaN or inf; a diverged run?): its predictions "
              "and metrics are meaningless; use a checkpoint of a run that finished", file=sys.stderr)


def truncation_warning(task: str, features: list[dict[str, Any]], max_length: int, what: str) -> str | None:
    """A warning when examples are longer than ``max_length`` tokens and were cut (NER: the words
    past the cut are predicted ``O``, so gold entities there count as misses).

    >>> truncation_warning("ner", [{"word_ids": [1, -1]}, {"word_ids": [1, 2]}], 4, "dev")
    'warning: 1 of 2 sentences of dev are longer than max_length 4 tokens and were cut (1 words predicted O unseen); raise --max-length'
    """
    if task == "ner":
        cut = [sum(1 for w in f.get("word_ids", []) if w < 0) for f in features]
        n = sum(1 for c in cut if c)
        if n:
            return (f"warning: {n} of {len(features)} sentences of {what} are longer than max_length {max_length} "
                    f"tokens and were cut ({sum(cut)} words predicted O unseen); raise --max-length")
        return None
    n = sum(1 for f in features if len(f["input_ids"]) >= max_length)
    if n:
        return (f"warning: {n} of {len(features)} texts of {what} reach max_length {max_length} tokens and were "
                "cut; raise --max-length to read them whole")
    return None
