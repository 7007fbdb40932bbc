"""The Python-backend models of a Triton repository (:func:`slimmable.export.export_triton`), each copied verbatim
as a ``model.py``: :mod:`.router` (the ``<name>_router`` model: picks a width per request and runs that version of
``<name>`` through BLS) and :mod:`.onnx_model` (with ``triton_backend="python"``: one width's ``model.onnx`` run by
onnxruntime inside the Python backend).

Each file stands alone: it imports neither slimmable nor each other (Triton's Python environment need not have
slimmable), and outside Triton it imports without ``triton_python_backend_utils``, so its logic is tested here.
"""

from pathlib import Path

__all__ = ["source"]


def source(module: str) -> str:
    """The text of the model file ``module`` (``"router"`` or ``"onnx_model"``), as written into a repository.

    Raises:
        ValueError: ``module`` is not one of the model files.
    """
    if module not in ("router", "onnx_model"):
        raise ValueError(f"no Triton model file {module!r}; the files are 'router' and 'onnx_model'")
    return (Path(__file__).parent / f"{module}.py").read_text(encoding="utf-8")
