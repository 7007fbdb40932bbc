"""Channel search and cost models (MACs, active parameters, latency)."""

from .cost import (
    WidthProfile,
    count_active_params,
    count_macs,
    count_macs_by_part,
    detector_image_size,
    detector_images,
    measure_latency,
    profile_widths,
)

__all__ = [
    "WidthProfile",
    "count_active_params",
    "count_macs",
    "count_macs_by_part",
    "detector_image_size",
    "detector_images",
    "measure_latency",
    "profile_widths",
]
