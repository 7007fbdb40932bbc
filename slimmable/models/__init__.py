"""Model families and the registry: ``create_model(name, widths=..., num_classes=..., **kw)``, ``list_models()``."""

from ._base import ChannelPlan, FeatureInfo, NormFactory, SlimNet
from ._registry import OFFICIAL_CHECKPOINTS, TASKS, create_model, list_models, model_task, register_model
from .detection import SlimBackboneWithFPN, create_slim_detector, load_official_backbone
from .mobilenet_v1 import SlimMobileNetV1
from .mobilenet_v2 import SlimMobileNetV2
from .resnet import SlimResNet
from .segmentation import create_slim_segmenter, is_segmenter
from .shufflenet import SlimShuffleNetV1
from .torchvision_weights import load_torchvision_weights
from .vit import SlimVisionTransformer

__all__ = [
    "OFFICIAL_CHECKPOINTS",
    "TASKS",
    "ChannelPlan",
    "FeatureInfo",
    "NormFactory",
    "SlimBackboneWithFPN",
    "SlimMobileNetV1",
    "SlimMobileNetV2",
    "SlimNet",
    "SlimResNet",
    "SlimShuffleNetV1",
    "SlimVisionTransformer",
    "create_model",
    "create_slim_detector",
    "create_slim_segmenter",
    "is_segmenter",
    "list_models",
    "load_official_backbone",
    "load_torchvision_weights",
    "model_task",
    "register_model",
]
