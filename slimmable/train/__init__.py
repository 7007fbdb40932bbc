"""Training: Algorithm 1, width samplers, optimizer/schedule factories, evaluation, distributed runs.

The checkpoint functions re-exported here live in :mod:`slimmable.checkpoint`.
"""

from .._utils import unwrap_model
from ..checkpoint import CHECKPOINT_FORMAT_VERSION, build_model_from_checkpoint, load_checkpoint, save_checkpoint
from ..tasks import model_kwargs_from_config
from .calibrate import add_stat_widths, calibrate_bn, calibrate_channels, fixed_channels_name
from .distributed import (
    DistInfo,
    SyncBatchNorm2d,
    average_bn_statistics,
    convert_sync_batchnorm,
    init_distributed,
    resolve_device,
    shutdown_distributed,
    wrap_ddp,
)
from .engine import (
    EpochStats,
    StepResult,
    Trainer,
    WidthMetrics,
    evaluate,
    soft_cross_entropy,
    train_step,
)
from .objectives import distillation_kl
from .optim import create_optimizer, create_scheduler, lr_factor, param_groups
from .report import REPORT_COLUMNS, plot_report, width_report, write_report
from .rng import get_rng_state, set_rng_state
from .run import TrainResult, train_from_config
from .samplers import AllWidths, Sandwich, WidthSampler, create_width_sampler
from .teacher import build_teacher

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "REPORT_COLUMNS",
    "AllWidths",
    "DistInfo",
    "EpochStats",
    "Sandwich",
    "StepResult",
    "SyncBatchNorm2d",
    "TrainResult",
    "Trainer",
    "WidthMetrics",
    "WidthSampler",
    "add_stat_widths",
    "average_bn_statistics",
    "build_model_from_checkpoint",
    "build_teacher",
    "calibrate_bn",
    "calibrate_channels",
    "convert_sync_batchnorm",
    "create_optimizer",
    "create_scheduler",
    "create_width_sampler",
    "distillation_kl",
    "evaluate",
    "fixed_channels_name",
    "get_rng_state",
    "init_distributed",
    "load_checkpoint",
    "lr_factor",
    "model_kwargs_from_config",
    "param_groups",
    "plot_report",
    "resolve_device",
    "save_checkpoint",
    "set_rng_state",
    "shutdown_distributed",
    "soft_cross_entropy",
    "train_from_config",
    "train_step",
    "unwrap_model",
    "width_report",
    "wrap_ddp",
    "write_report",
]
