"""A restricted unpickler for data files (CIFAR batches): plain containers and numpy arrays, never code.

``pickle.load`` runs whatever a file's ``__reduce__`` names (``os.system``, ...). The CIFAR python batches hold
only dicts, lists, strings, bytes, numbers and numpy arrays, so :func:`safe_load_pickle` resolves only the few
globals numpy needs to rebuild an array; any other global is refused before it is called.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

__all__ = ["UnsafePickleError", "safe_load_pickle"]

# (module, name) pairs a pickled numpy array (protocols 0-5, numpy 1.x and 2.x) references, and the codecs helper
# Python 3 uses to pickle bytes at protocol 2
_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("codecs", "encode"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """A data file references a Python global other than the numpy array constructors (it could run code)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"refers to {module}.{name}, which a data file has no reason to hold (it could run code); "
                "only dicts, lists, strings, bytes, numbers and numpy arrays are read"
            )
        return super().find_class(module, name)


def safe_load_pickle(path: str | os.PathLike[str], encoding: str = "latin1") -> Any:
    """Unpickle ``path`` allowing only plain containers, strings, bytes, numbers and numpy arrays.

    Args:
        path: the pickle file (e.g. a CIFAR ``data_batch_1``).
        encoding: how Python 2 ``str`` objects are decoded (``latin1`` for the CIFAR batches, as torchvision).

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: the file references any other global (its code is never run).
        pickle.UnpicklingError, EOFError, ValueError: a damaged file.
    """
    with open(Path(path), "rb") as f:
        return _RestrictedUnpickler(f, encoding=encoding).load()
