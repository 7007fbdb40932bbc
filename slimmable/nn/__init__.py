"""Slimmable layers and the width API."""

from .base import (
    SlimModule,
    get_channels,
    get_width,
    get_widths,
    record_input_channels,
    set_channels,
    set_layer_widths,
    set_width,
    slim_modules,
    use_width,
)
from .channels import ChannelRule, WidthRange, Widths, WidthTable, make_divisible, normalize_widths
from .converted import (
    ChannelSelect,
    ConvertedBatchNorm2d,
    IndexedSlimConv2d,
    IndexedSlimLinear,
    SlimGroupNorm,
    SlimLayerNorm,
)
from .layers import (
    SharedBatchNorm2d,
    SlimConv2d,
    SlimLinear,
    SwitchableBatchNorm2d,
    USBatchNorm2d,
    create_norm,
)

__all__ = [
    "ChannelRule",
    "ChannelSelect",
    "ConvertedBatchNorm2d",
    "IndexedSlimConv2d",
    "IndexedSlimLinear",
    "SharedBatchNorm2d",
    "SlimConv2d",
    "SlimGroupNorm",
    "SlimLayerNorm",
    "SlimLinear",
    "SlimModule",
    "SwitchableBatchNorm2d",
    "USBatchNorm2d",
    "WidthRange",
    "WidthTable",
    "Widths",
    "create_norm",
    "get_channels",
    "get_width",
    "get_widths",
    "make_divisible",
    "normalize_widths",
    "record_input_channels",
    "set_channels",
    "set_layer_widths",
    "set_width",
    "slim_modules",
    "use_width",
]
