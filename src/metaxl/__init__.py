"""metaxl: MetaXL (Xia et al., NAACL 2021) on any Hugging Face encoder.

>>> from metaxl import TrainConfig, train, evaluate, predict
>>> train.__module__     # the Python API; the training loop is metaxl.train.train (module metaxl.train)
'metaxl.api'
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"

# The public names load on first use, so that ``import metaxl`` (every CLI call, every sweep child)
# stays light: torch and transformers are imported only when needed.
_API = {"train": "api", "evaluate": "api", "predict": "api", "TrainResult": "api", "TrainConfig": "config"}


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'metaxl' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``metaxl.train`` and ``metaxl.predict`` name the API's functions: importing the submodules
    of the same names (``metaxl.train``: the training loop) must not rebind them, as Python's import
    system does for a submodule; the submodules stay in ``sys.modules``
    (``importlib.import_module("metaxl.train")``, ``from metaxl.train import ...``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("train", "predict") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "predict", "__version__"]
