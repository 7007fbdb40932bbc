"""Turn an existing PyTorch model into a slimmable one: ``slimmable.convert(model, widths=...)``.

Tracing (``torch.fx``), coupled channels, the replacement of layers by slimmable ones, and the conversion report.
"""

from .core import SlimGraphModule, convert
from .report import ConversionReport, GroupReport

__all__ = ["ConversionReport", "GroupReport", "SlimGraphModule", "convert"]
