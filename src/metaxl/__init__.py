"""metaxl: MetaXL (Xia et al., NAACL 2021) on any Hugging Face encoder.

>>> from metaxl import TrainConfig, train, evaluate, predict
>>> train.__module__     # the Python API; the training loop is metaxl.train.train (module metaxl.train)
'metaxl.api'
"""

__version__ = "0.1.0"

# the modules metaxl.train and metaxl.predict first: importing one later would rebind metaxl.train to it
from . import predict as _predict_module  # noqa: E402,F401
from . import train as _train_module  # noqa: E402,F401
from .api import TrainResult, evaluate, predict, train  # noqa: E402  (after __version__: train.py reads it)
from .config import TrainConfig  # noqa: E402

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "predict", "__version__"]
