"""CPU threads of a sweep's training runs, raised while they run once the sweep has no run left to start.

A local sweep with ``--jobs N`` gives each training child ``cores // N`` threads. Near its end fewer
runs are left than N (a MetaXL run takes about twice a JT run), and the cores of the runs that
ended would sit idle until the last one finishes. So the sweep writes each child's thread count
into a small file whose path the child gets as ``$METAXL_THREADS_FILE``; once no run is left to
start it raises the count of the runs still going (``cores // running``), and the child's
training loop, which looks at the file every few seconds, calls ``torch.set_num_threads``.

This module imports no torch: the sweep uses it too.

>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "threads"
>>> follower = ThreadsFile(path, every_s=0)
>>> follower.poll() is None        # no file yet: nothing to change
True
>>> write_threads(path, 2)
>>> follower.poll()
2
>>> follower.poll() is None        # unchanged since the last look
True
"""

from __future__ import annotations

import os
import time
from pathlib import Path

THREADS_FILE_ENV = "METAXL_THREADS_FILE"
"""The environment variable that gives a training child the path of its threads file."""


def write_threads(path: Path, threads: int) -> None:
    """Write ``threads`` into ``path`` atomically (a reader never sees a half-written file).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "t"
    >>> write_threads(p, 4)
    >>> read_threads(p)
    4
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{threads}\n")
    os.replace(tmp, path)


def read_threads(path: Path) -> int | None:
    """The thread count in ``path``, or None when it is missing or does not hold a count >= 1.

    >>> read_threads(Path("/nonexistent/threads")) is None
    True
    """
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        threads = int(text)
    except ValueError:
        return None
    return threads if threads >= 1 else None


class ThreadsFile:
    """Follows a threads file: :meth:`poll` returns the count when it changed since the last look.

    ``every_s`` spaces the looks (a training step calls :meth:`poll`; reading a file per step would
    cost more than it saves). :meth:`from_env` builds one from ``$METAXL_THREADS_FILE``, or None.
    """

    def __init__(self, path: Path, every_s: float = 5.0) -> None:
        self.path = path
        self.every_s = every_s
        self._seen: int | None = None
        self._next = 0.0

    @classmethod
    def from_env(cls, every_s: float = 5.0) -> ThreadsFile | None:
        """The follower of ``$METAXL_THREADS_FILE``, or None when the variable is unset.

        >>> os.environ.pop(THREADS_FILE_ENV, None) and None
        >>> ThreadsFile.from_env() is None
        True
        """
        path = os.environ.get(THREADS_FILE_ENV)
        return cls(Path(path), every_s) if path else None

    def poll(self) -> int | None:
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.every_s
        threads = read_threads(self.path)
        if threads is None or threads == self._seen:
            return None
        self._seen = threads
        return threads
