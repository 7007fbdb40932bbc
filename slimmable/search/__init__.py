"""Channel search and cost models (MACs, active parameters, latency)."""

from .cost import WidthProfile, count_active_params, count_macs, measure_latency, profile_widths

__all__ = ["WidthProfile", "count_active_params", "count_macs", "measure_latency", "profile_widths"]
