"""Model families and the registry: ``create_model(name, widths=..., num_classes=..., **kw)``, ``list_models()``."""

from ._base import ChannelPlan, FeatureInfo, SlimNet
from ._registry import create_model, list_models, register_model
from .mobilenet_v1 import SlimMobileNetV1
from .mobilenet_v2 import SlimMobileNetV2
from .resnet import SlimResNet
from .shufflenet import SlimShuffleNetV1

__all__ = [
    "ChannelPlan",
    "FeatureInfo",
    "SlimMobileNetV1",
    "SlimMobileNetV2",
    "SlimNet",
    "SlimResNet",
    "SlimShuffleNetV1",
    "create_model",
    "list_models",
    "register_model",
]
