"""slimmable: slimmable neural networks — one set of weights, several widths, switched at run time."""

from .convert import convert, sort_channels
from .models import create_model, list_models
from .models.torchvision_weights import load_torchvision_weights
from .nn import get_channels, get_width, get_widths, set_channels, set_width, use_width
from .tasks import task_of

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "convert",
    "create_model",
    "get_channels",
    "get_width",
    "get_widths",
    "list_models",
    "load_torchvision_weights",
    "set_channels",
    "set_width",
    "sort_channels",
    "task_of",
    "use_width",
]
