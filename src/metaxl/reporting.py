"""Logging (the ``metaxl`` logger) and experiment tracking (``--report-to tensorboard``).

The library logs through :mod:`logging` under the name ``metaxl``: user-facing lines (epochs, test
score) at INFO, details at DEBUG, problems at WARNING. The command line shows INFO and up (``-v``:
DEBUG too, ``-q``: warnings only); a script or notebook that configures no logging gets the same
INFO lines from :func:`metaxl.train` (:func:`default_handler`).

With ``report_to: [tensorboard]`` (``--report-to tensorboard``; ``pip install metaxl[tensorboard]``)
a run writes TensorBoard event files into its output folder: per step the training loss, the meta
loss, the hypergradient norm and the learning rates; per epoch the dev metrics. A sweep's runs have
one folder each, so ``tensorboard --logdir runs/<sweep>`` shows them side by side.

>>> configure_logging(verbose=1).level == logging.DEBUG
True
>>> _ = configure_logging()   # back to INFO
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError

logger = logging.getLogger("metaxl")

REPORT_TO = ("tensorboard",)
"""Experiment trackers ``report_to`` accepts."""

_HANDLER_NAME = "metaxl-default"


class _Formatter(logging.Formatter):
    """INFO lines as they are (the CLI's output); others prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno == logging.INFO:
            return text
        return f"metaxl: {record.levelname.lower()}: {text}"


class _PipeSafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that survives a closed pipe (``metaxl train ... | head -1``): later lines go
    to /dev/null and the run goes on to the end, so results.json is finished, not left "running"."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            self.flush()
        except BrokenPipeError:
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except Exception:  # noqa: BLE001 - logging's own policy for a failing handler
            self.handleError(record)


def configure_logging(verbose: int = 0, quiet: bool = False, stream: Any = None) -> logging.Logger:
    """Set up the ``metaxl`` logger for the command line: INFO (default), DEBUG (``verbose``) or
    WARNING (``quiet``), one handler writing to ``stream`` (default: stdout)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = _PipeSafeHandler(stream or sys.stdout)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def default_handler() -> None:
    """Show INFO lines when nothing configured logging (a notebook): as ``logging.basicConfig``
    would, only for the ``metaxl`` logger; a configured root logger or metaxl logger is left alone."""
    if logger.handlers or logging.getLogger().handlers:
        return
    configure_logging()


def info(*parts: Any, **_: Any) -> None:
    """A ``log`` callable for :func:`metaxl.train.train` that logs at INFO."""
    logger.info(" ".join(str(p) for p in parts))


# ---------------------------------------------------------------------------- TensorBoard
def check_report_to(values: list[str]) -> None:
    """Raise ConfigError for an unknown tracker, or TensorBoard not installed.

    >>> check_report_to([])
    >>> check_report_to(["wandb"])
    Traceback (most recent call last):
    metaxl.errors.ConfigError: report_to='wandb' is not valid; choose one of: tensorboard
    """
    for value in values:
        if value not in REPORT_TO:
            raise ConfigError(f"report_to={value!r} is not valid; choose one of: {', '.join(REPORT_TO)}")
    if "tensorboard" in values:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--report-to tensorboard needs the tensorboard package: "
                              "pip install 'metaxl[tensorboard]' (or pip install tensorboard)") from None


class TensorBoardReporter:
    """Writes a run's scalars into ``folder`` (TensorBoard event files).

    Step scalars (x axis: the global training step): ``train/loss``, ``train/meta_loss``,
    ``train/hypergrad_norm`` (the norm of phi's gradient, MetaXL), any other number the learner's
    step reports, and ``lr/encoder``, ``lr/head``, ``lr/rtn``. Epoch scalars (x axis: the epoch):
    ``dev/<metric>``, ``epoch/train_loss``, ``epoch/meta_loss``, ``epoch/seconds``; at the end
    ``test/<metric>`` at the best dev epoch.
    """

    def __init__(self, folder: Path, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run overwrites what the interrupted one logged after its last saved epoch
        self.writer = SummaryWriter(str(folder), purge_step=start_step or None)
        self.step = start_step

    def log_step(self, loss: float, stats: Any, learner: Any) -> None:
        self.step += 1
        self._scalar("train/loss", loss, self.step)
        if dataclasses.is_dataclass(stats):
            for f in dataclasses.fields(stats):
                if f.name == "loss":
                    continue
                name = "train/hypergrad_norm" if f.name == "phi_grad_norm" else f"train/{f.name}"
                self._scalar(name, getattr(stats, f.name), self.step)
        groups = learner.opt_theta.param_groups
        self._scalar("lr/encoder", groups[0]["lr"], self.step)
        if len(groups) > 1:
            self._scalar("lr/head", groups[1]["lr"], self.step)
        if learner.opt_phi is not None:
            self._scalar("lr/rtn", learner.opt_phi.param_groups[0]["lr"], self.step)

    def log_epoch(self, row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        for key, value in (row.get("dev") or {}).items():
            self._scalar(f"dev/{key}", value, epoch)
        for key, value in row.items():
            if key not in ("epoch", "dev", "best"):
                self._scalar(f"epoch/{key}", value, epoch)
        self.writer.flush()

    def log_test(self, metrics: dict[str, Any], epoch: int) -> None:
        for key, value in metrics.items():
            self._scalar(f"test/{key}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        self.writer.add_scalar(tag, float(value), step)


def make_reporter(report_to: list[str], folder: Path, writes: bool, start_step: int = 0) -> TensorBoardReporter | None:
    """The run's reporter, or None (nothing asked, no output folder, or not the main process)."""
    if "tensorboard" not in report_to:
        return None
    if not writes:
        logger.warning("--report-to tensorboard: no output folder (output_dir=None): nothing is reported")
        return None
    logger.info(f"tensorboard: event files in {folder} (tensorboard --logdir {folder})")
    return TensorBoardReporter(folder, start_step)
