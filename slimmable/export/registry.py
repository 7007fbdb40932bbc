"""The export targets by name: ``get_exporter("openvino").export(model, path, width=0.5)``.

Each target is one :class:`~slimmable.export.exporter.Exporter`; ``slimmable export --format`` and
:func:`~slimmable.export.bundle.export_bundle` read this table, so a target registered here is available to both.
This module imports the format modules; they import neither it nor each other (detection aside: ONNX export
dispatches detectors to :mod:`.detection`, which imports no format module).
"""

from __future__ import annotations

from .exporter import Exporter
from .formats import ONNX, PICKLE, TORCH_EXPORT, TORCHSCRIPT
from .openvino_ir import OPENVINO

__all__ = ["get_exporter", "list_exporters", "register_exporter"]

_REGISTRY: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter, *, replace: bool = False) -> Exporter:
    """Add ``exporter`` under its name (``replace``: over an existing one) and return it.

    Raises:
        ValueError: the name is taken and not ``replace``, or it is not a plain lowercase word usable as
            ``--format``.
    """
    name = exporter.name
    if not name or name != name.strip().lower() or " " in name:
        raise ValueError(f"exporter name {name!r} must be a lowercase word (it is a --format value)")
    if name in _REGISTRY and not replace:
        raise ValueError(f"an exporter named {name!r} is registered already; pass replace=True to replace it")
    _REGISTRY[name] = exporter
    return exporter


def get_exporter(name: str) -> Exporter:
    """The exporter registered as ``name``.

    Raises:
        ValueError: no such exporter; the message lists the registered names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown export format {name!r}; registered: {', '.join(_REGISTRY)}") from None


def list_exporters(*, available: bool = False, detection: bool = False) -> list[str]:
    """Registered names in registration order.

    Args:
        available: only those whose dependencies (to write and run the file) are installed.
        detection: only those that take torchvision detectors.
    """
    return [n for n, e in _REGISTRY.items() if (not available or e.available()) and (not detection or e.detection)]


for _exporter in (ONNX, TORCHSCRIPT, TORCH_EXPORT, OPENVINO, PICKLE):
    register_exporter(_exporter)
