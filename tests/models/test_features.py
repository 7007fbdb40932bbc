"""Stages and features: every registered family at every width gives stage maps with the channels and strides
``feature_info`` claims, and ``forward_head(forward_features(x)) == forward(x)``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import slimmable
from slimmable.export import export_width
from slimmable.models import FeatureInfo, SlimNet

STAGE_NAMES = {
    "mobilenet_v1": ["stem", *(f"stage{i}" for i in range(1, 6))],
    "mobilenet_v2": ["stem", *(f"stage{i}" for i in range(1, 8)), "conv_head"],
    "shufflenet_v1": ["stem", "stage1", "stage2", "stage3"],
    "resnet": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "vit": [f"blocks.{i}" for i in range(12)],  # tokens (N, 1 + patches, C) per block
}


def _family(name: str) -> str:
    return next(f for f in STAGE_NAMES if f in name)


def _eval_widths(model: SlimNet) -> tuple[float, ...]:
    """All switches of an S-Net; first, middle and last statistics width of a US-Net (eval needs statistics)."""
    ws = tuple(model.widths)
    return ws if model.width_range is None else (ws[0], ws[len(ws) // 2], ws[-1])


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("small_input", [True, False])
@pytest.mark.parametrize("name", slimmable.list_models(task="classification"))
def test_stage_maps_have_the_channels_and_strides_feature_info_claims(name: str, small_input: bool) -> None:
    torch.manual_seed(0)
    model = slimmable.create_model(name, num_classes=7, small_input=small_input).eval()
    info = model.feature_info
    assert [f.name for f in info] == STAGE_NAMES[_family(name)]
    assert all(isinstance(f, FeatureInfo) for f in info)
    strides = [f.stride for f in info]
    # small_input drops the stem's reductions: stride 2 of the mobile nets, 4 of ResNet and ShuffleNet; a ViT's
    # stages all sit on its patch grid (patch 16, small_input patch 4)
    small_last = 16 if "mobilenet" in name else 4 if "vit" in name else 8
    assert strides == sorted(strides) and strides[-1] == (small_last if small_input else 16 if "vit" in name else 32)
    side = 32 if small_input else 64
    x = torch.randn(2, 3, side, side)
    for w in _eval_widths(model):
        with torch.no_grad(), model.use_width(w):
            stages = model.forward_stages(x)
            feats = model.forward_features(x)
            logits = model(x)
            head = model.forward_head(feats)
        assert list(stages) == [f.name for f in info]
        assert model.feature_channels(w) == [f.channels(w) for f in info]
        for f, (key, y) in zip(info, stages.items()):
            if "vit" in name:  # the class token, then the patches' tokens
                assert y.shape == (2, 1 + math.ceil(side / f.stride) ** 2, f.channels(w)), (key, w, y.shape)
                continue
            assert y.shape[:2] == (2, f.channels(w)), (key, w)
            if "shufflenet" in name and not small_input:
                # the official stem's unpadded max pooling: 64 -> 32 -> 15 instead of 16, then back on the grid
                assert round(side / y.shape[-1]) == f.stride, (key, y.shape)
            else:
                assert y.shape[-2:] == (math.ceil(side / f.stride),) * 2, (key, w, y.shape)
        torch.testing.assert_close(feats, stages[info[-1].name], rtol=0, atol=0)
        torch.testing.assert_close(head, logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["us_mobilenet_v1", "us_mobilenet_v2"])
def test_us_channels_are_a_function_of_any_width_in_the_range(name: str) -> None:
    model = slimmable.create_model(name, num_classes=7, small_input=True).train()
    x = torch.randn(2, 3, 32, 32)
    for w in (model.width_range[0], 0.4123, 0.777, 1.0):  # off the statistics grid: batch statistics in training
        model.set_width(w)
        stages = model.forward_stages(x)
        assert [y.shape[1] for y in stages.values()] == model.feature_channels(w) == model.feature_channels()
    slimmed = [f for f in model.feature_info if f.rule is not None]  # all but MobileNet v2's fixed conv_head
    assert len(slimmed) >= len(model.feature_info) - 1
    assert all(f.channels(0.777) <= f.num_channels for f in slimmed)
    assert slimmed[-1].channels(0.777) < slimmed[-1].num_channels  # (narrow stages round up to 8 channels)


def test_forward_stages_out_indices_select_and_stop_early() -> None:
    model = slimmable.create_model("slim_resnet50", num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), model.use_width(0.5):
        everything = model.forward_stages(x)
        picked = model.forward_stages(x, out_indices=(1, -1, 3))
    assert list(picked) == ["layer1", "layer3", "layer4"]  # stage order, whatever the order asked
    assert [y.shape[1] for y in picked.values()] == [128, 512, 1024]  # 256/1024/2048 at width 0.5 (int rounding)
    for k, y in picked.items():
        torch.testing.assert_close(y, everything[k], rtol=0, atol=0)
    calls = []
    handle = model.features[-2].register_forward_hook(lambda *a: calls.append(1))  # the last block of layer4
    with torch.no_grad():
        model.forward_stages(x, out_indices=[0, 2])
    handle.remove()
    assert not calls  # stopped after layer2
    with pytest.raises(ValueError, match=r"out_indices \[5\] must be distinct positions in the 5 stages"):
        model.forward_stages(x, out_indices=[5])
    with pytest.raises(ValueError, match="distinct"):
        model.forward_stages(x, out_indices=[1, -4])


def test_resnet_stages_are_named_views_and_official_keys_stay() -> None:
    model = slimmable.create_model("slim_resnet50")
    modules = model.stage_modules()
    assert list(modules) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert [len(v) for v in modules.values()] == [1, 3, 4, 6, 3]
    assert modules["layer2"][0] is model.features[4]
    keys = model.state_dict().keys()
    assert "features.4.shortcut.0.weight" in keys and not any(k.startswith(("layer", "stem")) for k in keys)
    assert [f.channels(0.25) for f in model.feature_info] == [16, 64, 128, 256, 512]
    assert [f.stride for f in model.feature_info] == [4, 4, 8, 16, 32]
    shuffle = slimmable.create_model("slim_shufflenet_v1")
    assert shuffle.stage_modules()["stem"] == [shuffle.head_0, shuffle.head_1, shuffle.head_2]


def test_resnet_small_input_stem_stride_2_halves_every_stage() -> None:
    model = slimmable.create_model("slim_resnet18", num_classes=7, small_input=True, stem_stride=2).eval()
    assert [f.stride for f in model.feature_info] == [2, 2, 4, 8, 16]
    with torch.no_grad():
        stages = model.forward_stages(torch.randn(1, 3, 32, 32))
    assert [y.shape[-1] for y in stages.values()] == [16, 16, 8, 4, 2]


def test_exported_model_keeps_its_stages() -> None:
    torch.manual_seed(0)
    model = slimmable.create_model("slim_mobilenet_v2", num_classes=7, small_input=True).eval()
    dense = export_width(model, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), model.use_width(0.5):
        ref = model.forward_stages(x, out_indices=[2, 4])
        out = dense.forward_stages(x, out_indices=[2, 4])
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=0)


# -- features-only backbones (create_model(..., features_only=True)) --------------------------------------------------


def test_features_only_returns_the_chosen_stage_maps_and_drops_the_head() -> None:
    torch.manual_seed(0)
    full = slimmable.create_model("slim_mobilenet_v2", num_classes=7, small_input=True).eval()
    backbone = slimmable.create_model(
        "slim_mobilenet_v2", num_classes=7, small_input=True, features_only=True, out_indices=(5, 2)
    ).eval()
    assert backbone.out_indices == (2, 5) and backbone.out_names == ("stage2", "stage5")
    assert backbone.model_kwargs == {
        "num_classes": 7,
        "small_input": True,
        "features_only": True,
        "out_indices": (5, 2),
    }
    assert [f.name for f in backbone.out_feature_info] == ["stage2", "stage5"]
    assert len(backbone.feature_info) == len(full.feature_info)  # positions stay those of every stage
    # the classifier and everything after stage5 are gone (no parameters without gradients); other keys stay
    assert isinstance(backbone.classifier, nn.Identity)
    assert all(isinstance(m, nn.Identity) for m in backbone.features[14:])
    assert backbone.dropped_layers() == ["classifier", *(f"features.{i}" for i in range(14, 20))]
    own = backbone.state_dict()
    assert set(own) < set(full.state_dict())
    assert not any(k.startswith(("classifier.", "features.14.", "features.18.")) for k in own)
    backbone.load_state_dict({k: v for k, v in full.state_dict().items() if k in own})
    x = torch.randn(2, 3, 32, 32)
    for w in (0.35, 1.0):
        with torch.no_grad(), full.use_width(w), backbone.use_width(w):
            want = full.forward_stages(x, (2, 5))
            got = backbone(x)
        assert list(got) == ["stage2", "stage5"]
        assert [t.shape[1] for t in got.values()] == [f.channels(w) for f in backbone.out_feature_info]
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_features_only_out_names_and_errors() -> None:
    model = slimmable.create_model(
        "slim_resnet18", features_only=True, out_indices=(-1, 3), out_names=("out", "aux"), small_input=True
    ).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 32, 32))
    assert list(maps) == ["aux", "out"] and [t.shape[1] for t in maps.values()] == [256, 512]
    # built again from its record, as a checkpoint rebuilds it
    again = slimmable.create_model(model.model_name, **model.model_kwargs)
    assert again.out_indices == (3, 4) and again.out_names == ("aux", "out")
    # a narrower selection of the stages kept is fine; a dropped stage cannot come back
    shallow = slimmable.create_model("slim_resnet18", features_only=True, out_indices=(2,))
    with pytest.raises(ValueError, match="stage layer3 was dropped"):
        shallow.as_features_only((3,))
    assert shallow.as_features_only((1,)).out_names == ("layer1",)
    with pytest.raises(ValueError, match="distinct positions in the 5 stages"):
        slimmable.create_model("slim_resnet18", features_only=True, out_indices=(1, 7))
    with pytest.raises(ValueError, match="out_names .* must be 2 distinct names"):
        slimmable.create_model("slim_resnet18", features_only=True, out_indices=(1, 2), out_names=("a",))
    with pytest.raises(ValueError, match="out_indices select.* add features_only=True"):
        slimmable.create_model("slim_resnet18", out_indices=(1, 2))
    with pytest.raises(ValueError, match="features_only=True makes a backbone"):
        slimmable.create_model("slim_fasterrcnn_resnet18_fpn", features_only=True)


def test_shufflenet_features_only_keeps_its_stem_branches() -> None:
    model = slimmable.create_model("slim_shufflenet_v1", features_only=True, out_indices=(0, 1), small_input=True)
    assert all(isinstance(m, nn.Identity) for m in model.features[4:])
    with torch.no_grad():
        maps = model.eval()(torch.randn(1, 3, 32, 32))
    assert list(maps) == ["stem", "stage1"] and maps["stage1"].shape[1] == model.feature_info[1].channels(2.0)


def test_detection_and_segmentation_read_no_private_stage_attributes() -> None:
    # a backbone is built through create_model(features_only=True) and read through SlimNet's public methods
    root = Path(slimmable.__file__).parent
    owners = {root / "models" / "_base.py"}
    for path in root.rglob("*.py"):
        if path not in owners:
            assert "_stage_bounds" not in path.read_text(), path
