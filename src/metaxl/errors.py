"""User-facing errors.

Anything the user can fix (a missing file, a malformed line, a bad flag value) raises
:class:`MetaXLError`. The CLI prints its message on one line and exits with status 2, with no
traceback. Bugs raise ordinary exceptions.

>>> from metaxl.errors import MetaXLError
>>> try:
...     raise MetaXLError("data/train.txt:12: expected 'token TAG', got 'foo'")
... except MetaXLError as e:
...     print(e)
data/train.txt:12: expected 'token TAG', got 'foo'
"""


class MetaXLError(Exception):
    """An error the user can fix; the message says what to do."""


class DataError(MetaXLError):
    """A data file is missing, malformed, empty, or has labels that cannot be reconciled."""


class ConfigError(MetaXLError):
    """A configuration value is invalid (unknown method, layer out of range, ...)."""


class ModelError(MetaXLError):
    """A model cannot be loaded or converted."""
