"""Slimmable segmentation models: torchvision's outputs at width 1.0 after load_torchvision_weights, every width's
shapes through the width API, the ASPP's per-branch slimming, small grey images, the dilated ResNet."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import LRASPP, DeepLabV3, deeplabv3_resnet50, fcn_resnet50
from torchvision.models.segmentation.deeplabv3 import ASPP

import slimmable
from slimmable.checkpoint import build_model_from_checkpoint, model_checkpoint
from slimmable.export import export_width
from slimmable.models import load_official_backbone, model_task
from slimmable.nn import IndexedSlimConv2d, SlimConv2d, SwitchableBatchNorm2d, get_widths, make_divisible

SEGMENTERS = ["slim_deeplabv3_resnet50", "slim_fcn_resnet50", "slim_lraspp_mobilenet_v2"]


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random BN statistics and affine (every BatchNorm2d, each switch of a switchable one included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.running_mean.shape[0]
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def _tv_lraspp_mobilenet_v2(num_classes: int) -> LRASPP:
    """torchvision's LR-ASPP on MobileNet v2's features: low = features.6 (stride 8), high = features.17 (32)."""
    trunk = IntermediateLayerGetter(torchvision.models.mobilenet_v2().features, {"6": "low", "17": "high"})
    return LRASPP(trunk, 32, 320, num_classes)


def _close(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize(
    ("name", "builder", "aux"),
    [("slim_fcn_resnet50", fcn_resnet50, True), ("slim_deeplabv3_resnet50", deeplabv3_resnet50, False)],
)
def test_resnet50_segmenters_equal_torchvision_at_width_1(name, builder, aux) -> None:
    torch.manual_seed(0)
    ref = _randomize(builder(weights=None, weights_backbone=None, num_classes=3, aux_loss=aux), seed=1)
    model = slimmable.create_model(name, num_classes=3, aux_loss=aux).eval()
    assert type(model) is type(ref)  # torchvision's own FCN / DeepLabV3
    slimmable.load_torchvision_weights(model, ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = ref(x), model(x)
        _close(got, want)
        assert list(got) == (["out", "aux"] if aux else ["out"])
        with slimmable.use_width(model, 0.25):  # a narrower width runs on the same weights
            narrow = model(x)
    assert [t.shape for t in narrow.values()] == [(2, 3, 64, 64)] * len(want)
    assert not torch.allclose(narrow["out"], got["out"])
    assert slimmable.get_width(model) == 1.0


def test_lraspp_mobilenet_v2_equals_torchvision_at_width_1_and_runs_at_every_width() -> None:
    torch.manual_seed(0)
    ref = _randomize(_tv_lraspp_mobilenet_v2(num_classes=4), seed=2)
    model = slimmable.create_model("slim_lraspp_mobilenet_v2", num_classes=4).eval()
    assert isinstance(model, LRASPP)
    slimmable.load_torchvision_weights(model, ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _close(model(x), ref(x))
    assert get_widths(model).switches == model.widths == (0.35, 0.5, 0.75, 1.0)
    head = model.classifier
    for w in model.widths:
        slimmable.set_width(model, w)
        with torch.no_grad():
            maps = model.backbone(x)
            out = model(x)["out"]
        assert list(maps) == ["low", "high"]
        assert [t.shape[1] for t in maps.values()] == [make_divisible(32 * w), make_divisible(320 * w)]
        assert [t.shape[-1] for t in maps.values()] == [8, 2]  # strides 8 and 32
        assert head.cbr[0].active_out == head.scale[1].active_out == make_divisible(128 * w)
        assert out.shape == (2, 4, 64, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"width 0\.3 "):
        slimmable.set_width(model, 0.3)
    assert slimmable.get_width(model) == 1.0  # a refused width changes nothing


@pytest.mark.parametrize(("widths", "full", "c", "cin"), [((0.5, 1.0), 256, 128, 1024), ((0.25, 0.5), 128, 64, 512)])
def test_deeplab_aspp_slims_each_branch_and_its_projection_reads_the_matching_columns(widths, full, c, cin) -> None:
    # At its narrowest width the head must equal a dense DeepLab head of c channels holding, for each of the five
    # concatenated branches (full channels at the widest width), its leading c channels, and the projection's
    # matching weight columns. A model whose widest width is 0.5 builds its head at that size.
    torch.manual_seed(0)
    model = _randomize(slimmable.create_model("slim_deeplabv3_resnet50", num_classes=3, widths=widths), seed=3)
    head = model.classifier
    project = head[0].project[0]
    assert isinstance(project, IndexedSlimConv2d) and isinstance(head[0].convs[1][0], SlimConv2d)
    assert project.weight.shape == (full, 5 * full, 1, 1)
    rates = tuple(head[0].convs[i][0].dilation[0] for i in (1, 2, 3))
    assert rates == (12, 24, 36)
    dense = nn.Sequential(
        ASPP(cin, rates, c),
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, 3, 1),
    ).eval()
    with torch.no_grad():
        for ours, theirs in zip(head[0].convs, dense[0].convs):
            conv = next(m for m in ours if isinstance(m, SlimConv2d))
            bn = next(m for m in ours if isinstance(m, SwitchableBatchNorm2d))
            tconv = next(m for m in theirs if isinstance(m, nn.Conv2d))
            tconv.weight.copy_(conv.weight[:c, :cin])
            next(m for m in theirs if isinstance(m, nn.BatchNorm2d)).load_state_dict(bn.bn[0].state_dict())
        columns = torch.cat([torch.arange(k * full, k * full + c) for k in range(5)])
        dense[0].project[0].weight.copy_(project.weight[:c, columns])
        dense[0].project[1].load_state_dict(head[0].project[1].bn[0].state_dict())
        dense[1].weight.copy_(head[1].weight[:c, :c])
        dense[2].load_state_dict(head[2].bn[0].state_dict())
        dense[4].weight.copy_(head[4].weight[:, :c])
        dense[4].bias.copy_(head[4].bias)
        features = torch.randn(2, cin, 8, 8)
        with slimmable.use_width(model, widths[0]):
            got = head(features)
    torch.testing.assert_close(got, dense(features))


def test_small_grey_images_train_and_export_at_a_narrow_width() -> None:
    # Fashion-MNIST-sized: 1 channel, 28x28, 10 classes; the ResNet-50 models kept small (widths up to 0.5,
    # stem stride 2: output stride 4) for a CPU test
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    target = torch.randint(0, 10, (4, 28, 28))
    options = {"in_chans": 1, "num_classes": 10, "small_input": True}
    resnet = {"widths": (0.25, 0.5), "stem_stride": 2}
    for name, extra in [
        ("slim_lraspp_mobilenet_v2", {}),
        ("slim_fcn_resnet50", {**resnet, "aux_loss": True}),
        ("slim_deeplabv3_resnet50", resnet),
    ]:
        model = slimmable.create_model(name, **options, **extra).train()
        assert model.backbone.features[0][0].in_channels == 1
        with slimmable.use_width(model, model.widths[0]):
            out = model(x)
            loss = sum(nn.functional.cross_entropy(t, target) for t in out.values())
            loss.backward()
        assert all(t.shape == (4, 10, 28, 28) for t in out.values()), name
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        model.eval()
        dense = export_width(model, model.widths[0], example=x[:1])
        with torch.no_grad(), slimmable.use_width(model, model.widths[0]):
            _close(dense(x), model(x))
        assert not any(isinstance(m, (SlimConv2d, SwitchableBatchNorm2d)) for m in dense.modules())


def test_dilated_resnet50_equals_torchvision_and_keeps_stride_8() -> None:
    torch.manual_seed(0)
    ref = _randomize(torchvision.models.resnet50(num_classes=5, replace_stride_with_dilation=[False, True, True]), 4)
    model = slimmable.create_model("slim_resnet50", num_classes=5, replace_stride_with_dilation=(False, True, True))
    assert [f.stride for f in model.feature_info] == [4, 4, 8, 8, 8]
    # torchvision's _make_layer: a dilated stage's first block keeps the dilation before it
    dilations = [b.body[3].dilation[0] for b in model.features[1:-1]]
    assert dilations == [1] * 3 + [1] * 4 + [1] + [2] * 5 + [2] + [4] * 2
    slimmable.load_torchvision_weights(model, ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x))
        stages = model.forward_stages(x)
    assert [t.shape[-1] for t in stages.values()] == [16, 16, 8, 8, 8]
    with pytest.raises(ValueError, match="needs bottleneck blocks .* not ResNet-18's basic blocks"):
        slimmable.create_model("slim_resnet18", replace_stride_with_dilation=(False, False, True))
    with pytest.raises(ValueError, match="needs three flags"):
        slimmable.create_model("slim_resnet50", replace_stride_with_dilation=(True, True))


def test_torchvision_weights_that_do_not_fit_are_refused_and_classifier_weights_fill_the_backbone() -> None:
    torch.manual_seed(0)
    model = slimmable.create_model("slim_lraspp_mobilenet_v2", num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"classifier\.low_classifier\.weight \(6, 32, 1, 1\) does not fit"):
        slimmable.load_torchvision_weights(model, _tv_lraspp_mobilenet_v2(num_classes=6))
    detector = slimmable.create_model("slim_fasterrcnn_mobilenet_v2_fpn").state_dict()
    with pytest.raises(ValueError, match="the source is a detector but the model is a segmentation model"):
        slimmable.load_torchvision_weights(model, detector)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # all or nothing
    # an ImageNet classifier's weights fill the backbone; the head keeps its values, the 1x1 conv head is dropped
    mnv2 = _randomize(torchvision.models.mobilenet_v2(), seed=5)
    slimmable.load_torchvision_weights(model, mnv2)
    torch.testing.assert_close(model.backbone.features[17].body[6].weight, mnv2.features[17].conv[2].weight)
    torch.testing.assert_close(
        model.backbone.features[3].body[1].bn[0].running_var, mnv2.features[3].conv[0][1].running_var[:48]
    )
    torch.testing.assert_close(model.classifier.cbr[0].weight, before["classifier.cbr.0.weight"], rtol=0, atol=0)
    assert isinstance(model.backbone.features[18], nn.Identity) and isinstance(model.backbone.classifier, nn.Identity)


def test_fcn_aux_head_must_match_the_source() -> None:
    ref = fcn_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
    model = slimmable.create_model("slim_fcn_resnet50", num_classes=3)
    with pytest.raises(ValueError, match=r"source entries without a place in the model, e\.g\. \['aux_classifier"):
        slimmable.load_torchvision_weights(model, ref)


def test_official_s_resnet50_weights_fill_the_dilated_backbone() -> None:
    torch.manual_seed(0)
    src = _randomize(slimmable.create_model("slim_resnet50"), seed=6)
    ckpt = {"model": {f"module.{k}": v for k, v in src.state_dict().items()}}
    model = slimmable.create_model("slim_deeplabv3_resnet50", num_classes=3, aux_loss=True)
    load_official_backbone(ckpt, model)
    own = model.backbone.state_dict()
    assert len(own) == len(src.state_dict()) - 2  # all but the classifier's weight and bias
    for k, v in own.items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_registry_records_and_checkpoints_rebuild_segmenters() -> None:
    assert slimmable.list_models(task="segmentation") == SEGMENTERS
    assert all(model_task(n) == "segmentation" for n in SEGMENTERS)
    assert not set(SEGMENTERS) & set(slimmable.list_models(task="classification"))
    torch.manual_seed(0)
    model = slimmable.create_model("slim_lraspp_mobilenet_v2", num_classes=3, widths=(0.5, 1.0), in_chans=1)
    assert model.model_kwargs == {"num_classes": 3, "widths": (0.5, 1.0), "in_chans": 1}
    again = build_model_from_checkpoint(model_checkpoint(_randomize(model, seed=7)))
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad(), slimmable.use_width(model, 0.5), slimmable.use_width(again, 0.5):
        _close(again(x), model(x))
    with pytest.raises(ValueError, match="aux_loss is not an option of slim_lraspp_mobilenet_v2"):
        slimmable.create_model("slim_lraspp_mobilenet_v2", aux_loss=True)
    with pytest.raises(ValueError, match="atrous_rates is not an option of slim_fcn_resnet50"):
        slimmable.create_model("slim_fcn_resnet50", atrous_rates=(6, 12, 18))
    with pytest.raises(ValueError, match="features_only=True makes a backbone"):
        slimmable.create_model("slim_fcn_resnet50", features_only=True)


def test_deeplab_with_aux_head_equals_torchvision_at_224() -> None:
    torch.manual_seed(0)
    ref = _randomize(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True), 8)
    model = slimmable.create_model("slim_deeplabv3_resnet50", aux_loss=True).eval()
    assert isinstance(model, DeepLabV3)
    slimmable.load_torchvision_weights(model, ref)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _close(model(x), ref(x))
