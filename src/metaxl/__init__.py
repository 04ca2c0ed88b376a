"""metaxl: MetaXL (Xia et al., NAACL 2021) on any Hugging Face encoder.

>>> from metaxl import TrainConfig, train, evaluate, predict
>>> import metaxl.train as loop  # the training loop's module; called, it is the API's train (metaxl.api.train)
>>> import inspect
>>> loop is train and callable(loop.batches) and list(inspect.signature(train).parameters)[0]
'config'
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import inspect

__version__ = "0.1.0"

# The public names load on first use, so that ``import metaxl`` (every CLI call, every sweep child)
# stays light: torch and transformers are imported only when needed.
_API = {"evaluate": "api", "TrainResult": "api", "TrainConfig": "config"}
_CALLABLE_MODULES = ("train", "predict")  # the submodules that, called, are the API's functions


def __getattr__(name: str) -> Any:
    import importlib

    if name in _CALLABLE_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'metaxl' has no attribute {name!r}")


class CallableModule(types.ModuleType):
    """``metaxl.train`` and ``metaxl.predict`` are both a submodule and the Python API's function:
    ``metaxl.train(cfg)`` calls :func:`metaxl.api.train`, while ``import metaxl.train as tr`` and
    ``from metaxl.train import batches`` reach the module (the training loop). Set as the class of
    those two modules (``sys.modules[__name__].__class__ = CallableModule``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """metaxl.api.train / metaxl.api.predict, by the module's name."""
        return self._api_function()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # help() and notebooks show the API's arguments
        import inspect

        return inspect.signature(self._api_function())

    def _api_function(self) -> Any:
        from . import api

        return getattr(api, self.__name__.rpartition(".")[2])


__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "predict", "__version__"]
