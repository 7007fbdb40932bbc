"""The channel configurations AutoSlim found on ImageNet (official AutoSlim configs), as ChannelSpecs.

The official configs list channels by position; here they are turned into specs keyed by our module names, so
``create_model("slim_mobilenet_v2", channels=official_autoslim_spec("mobilenet_v2", "207M"))`` builds the found
network. The numbers are the published search results (facts, not code).
"""

from __future__ import annotations

__all__ = ["OFFICIAL_AUTOSLIM", "official_autoslim_spec"]

# MobileNet v2: stem, first block's output, then (expansion, output) for each of the other 16 blocks, the last
# 1x1 conv. MobileNet v1: stem, then the output of each of the 13 depthwise-separable blocks.
OFFICIAL_AUTOSLIM: dict[str, dict[str, tuple[int, ...]]] = {
    "mobilenet_v2": {
        "207M": (8, 8, 96, 16, 96, 16, 96, 24, 144, 24, 144, 24, 144, 48, 288, 48, 288, 48, 288, 48, 288, 64, 432, 64,
                 432, 64, 648, 176, 720, 176, 720, 176, 1440, 280, 1920),
        "305M": (8, 8, 96, 16, 96, 16, 96, 24, 144, 24, 144, 24, 144, 56, 288, 56, 288, 56, 288, 56, 288, 96, 432, 96,
                 432, 96, 864, 240, 1440, 240, 960, 240, 1440, 480, 1920),
        "505M": (32, 16, 144, 24, 176, 24, 192, 48, 240, 48, 144, 48, 264, 88, 288, 88, 336, 88, 432, 88, 576, 144,
                 576, 144, 648, 144, 864, 240, 1440, 240, 1440, 240, 1440, 480, 1920),
    },
    "mobilenet_v1": {
        "150M": (16, 32, 48, 48, 88, 88, 224, 176, 224, 368, 320, 224, 744, 744),
        "325M": (16, 32, 48, 64, 112, 184, 320, 368, 320, 416, 464, 560, 1128, 1128),
        "572M": (24, 64, 128, 144, 232, 232, 560, 464, 512, 464, 560, 560, 1128, 1128),
    },
}  # fmt: skip


def official_autoslim_spec(family: str, budget: str) -> dict[str, int]:
    """ChannelSpec of an official AutoSlim network.

    Args:
        family: ``"mobilenet_v1"`` or ``"mobilenet_v2"``.
        budget: the config's MACs label, e.g. ``"207M"``.

    Returns:
        Layer name → channels, for ``create_model(f"slim_{family}", channels=spec)``.
    """
    if family not in OFFICIAL_AUTOSLIM or budget not in OFFICIAL_AUTOSLIM[family]:
        known = {f: sorted(b) for f, b in OFFICIAL_AUTOSLIM.items()}
        raise ValueError(f"no official AutoSlim config {family!r} {budget!r}; known: {known}")
    counts = list(OFFICIAL_AUTOSLIM[family][budget])
    spec = {"features.0.0": counts.pop(0)}
    if family == "mobilenet_v1":
        for k in range(1, 14):
            spec[f"features.{k}.body.3"] = counts.pop(0)
        return spec
    spec["features.1.body.3"] = counts.pop(0)
    for k in range(2, 18):
        spec[f"features.{k}.body.0"] = counts.pop(0)
        spec[f"features.{k}.body.6"] = counts.pop(0)
    spec["features.18.0"] = counts.pop(0)
    assert not counts
    return spec
