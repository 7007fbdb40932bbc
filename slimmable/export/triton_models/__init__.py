"""The Python-backend models of a Triton repository (:func:`slimmable.export.export_triton`), each copied verbatim
as a ``model.py``: :mod:`.router` (the ``<name>_router`` model: picks a width per request and runs that version of
``<name>`` through BLS) and :mod:`.onnx_model` (with ``triton_backend="python"``: one width's ``model.onnx`` run by
onnxruntime inside the Python backend). The router's width policy is :mod:`slimmable.runtime.policy`, copied
verbatim beside it as ``width_policy.py`` (it needs only the standard library), so Triton and ``slimmable serve``
choose widths by the same code.

Each file stands alone: it imports neither slimmable nor the other model file (Triton's Python environment need
not have slimmable), and outside Triton it imports without ``triton_python_backend_utils``, so its logic is tested
here.
"""

from pathlib import Path

__all__ = ["source"]


_FILES = {
    "router": Path(__file__).parent / "router.py",
    "onnx_model": Path(__file__).parent / "onnx_model.py",
    "width_policy": Path(__file__).parents[2] / "runtime" / "policy.py",
}


def source(module: str) -> str:
    """The text of the file ``module`` (``"router"``, ``"onnx_model"`` or ``"width_policy"``), as written into a
    repository.

    Raises:
        ValueError: ``module`` is not one of the files.
    """
    if module not in _FILES:
        raise ValueError(f"no Triton model file {module!r}; the files are {', '.join(map(repr, _FILES))}")
    return _FILES[module].read_text(encoding="utf-8")
