"""Turn an existing PyTorch model into a slimmable one: ``slimmable.convert(model, widths=...)``.

Tracing (``torch.fx``), coupled channels, the replacement of layers by slimmable ones, the conversion report, and
``sort_channels`` (channels reordered by importance, so that each width keeps the most important ones).
"""

from .core import SlimGraphModule, convert
from .report import ConversionReport, GroupReport, SortedGroup, SortReport
from .sort import IMPORTANCES, sort_channels

__all__ = [
    "IMPORTANCES",
    "ConversionReport",
    "GroupReport",
    "SlimGraphModule",
    "SortReport",
    "SortedGroup",
    "convert",
    "sort_channels",
]
