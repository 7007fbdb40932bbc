"""The user's own weights for a zoo model: create_model(..., weights=FILE), `slimmable convert --weights`, errors."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch

import slimmable
from slimmable.checkpoint import build_model_from_checkpoint
from slimmable.cli.main import main
from slimmable.convert.zoo import create_original_model, load_original_weights

ZOO = "torchvision/resnet18"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A resnet18 (7 classes) whose weights and BN statistics differ from any random initialisation, and its file."""
    torch.manual_seed(11)
    model = create_original_model(ZOO, num_classes=7)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.02)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("w") / "resnet18_7.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_converted_model_at_full_width_equals_the_original_with_its_weights(trained) -> None:
    original, path = trained
    slim = slimmable.create_model(ZOO, num_classes=7, widths=(0.5, 1.0), weights=path).eval()
    assert "weights" not in slim.model_kwargs  # the state dict carries them
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), original(x), rtol=0, atol=0)
        # the narrow switch starts from the loaded statistics of the channels it keeps
        bn = slim.get_submodule("bn1")
        torch.testing.assert_close(bn.switches[0].running_mean, original.bn1.running_mean[:32])
        random = slimmable.create_model(ZOO, num_classes=7, widths=(0.5, 1.0)).eval()
        assert (random(x) - original(x)).abs().max() > 1e-2


def test_cli_converts_the_users_weights_and_the_checkpoint_rebuilds_them(trained, tmp_path: Path, capsys) -> None:
    original, path = trained
    out = tmp_path / "slim.pt"
    argv = ["convert", ZOO, "--widths", "0.5,1.0", "--num-classes", "7", "--input-size", "32"]
    assert main([*argv, "--weights", str(path), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model = build_model_from_checkpoint(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_weights_errors_are_one_line(trained, tmp_path: Path, capsys) -> None:
    original, path = trained
    argv = ["convert", ZOO, "--widths", "0.5,1.0", "--input-size", "32"]
    cases = []
    cases.append((tmp_path / "missing.pt", "does not exist; give the state dict of torchvision/resnet18"))
    nested = tmp_path / "nested.pt"
    torch.save({"model": original.state_dict(), "epoch": 3}, nested)
    cases.append((nested, "is not a state dict of torchvision/resnet18, a mapping of names to tensors (it holds the "
                          "mappings ['model']"))  # fmt: skip
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(pickle.dumps({"fc.weight": slice(1, 2)}, protocol=2))
    cases.append((pickled, "cannot be read with torch.load(weights_only=True)"))
    # 1000 classes by default: the 7-class head does not fit; named with both shapes
    cases.append((path, "2 shapes differ (file vs model: fc.weight (7, 512) vs (1000, 512), fc.bias (7,) vs (1000,))"))
    for file, message in cases:
        assert main([*argv, "--weights", str(file)]) == 2, file
        assert message in _one_line(capsys.readouterr().err)
    sd = dict(original.state_dict())
    sd.pop("fc.bias")
    sd["head.weight"] = sd.pop("fc.weight")
    renamed = tmp_path / "renamed.pt"
    torch.save(sd, renamed)
    assert main([*argv, "--num-classes", "7", "--weights", str(renamed)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "2 keys missing (e.g. fc.weight, fc.bias)" in line and "1 keys unexpected (e.g. head.weight)" in line


def test_weights_must_be_a_file_or_a_mapping() -> None:
    with pytest.raises(TypeError, match="weights must be a state dict file or mapping, got int"):
        load_original_weights(torch.nn.Linear(2, 2), 3)
    lin = torch.nn.Linear(2, 2)
    load_original_weights(lin, {"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
    assert torch.equal(lin.weight, torch.ones(2, 2))


def test_model_sort_sorts_the_users_weights_at_conversion(trained, tmp_path: Path) -> None:
    """``model.sort`` (create_model(..., sort=)): the widest width still equals the original, the narrow one now
    keeps the channels of largest |gamma| in the first BN, and checkpoints neither record it nor redo it."""
    from slimmable.config import ModelConfig
    from slimmable.tasks.base import model_kwargs_from_config

    original, _ = trained
    original = copy.deepcopy(original)
    with torch.no_grad():  # BN scales that differ per channel (the fixture's are all 1.52)
        for m in original.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.1, 2.0)
    path = tmp_path / "gammas.pt"
    torch.save(original.state_dict(), path)
    slim = slimmable.create_model(ZOO, num_classes=7, widths=(0.5, 1.0), weights=path, sort="bn").eval()
    assert "sort" not in slim.model_kwargs and slim.conversion_report.sort is not None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), original(x), rtol=1e-5, atol=1e-5)
    gamma = slim.get_submodule("bn1").weight.detach().abs()
    stream = gamma.shape[0]
    assert not torch.equal(gamma, original.bn1.weight.detach().abs())  # the order changed
    # bn1's group is the residual stream of layer1: its first half is what width 0.5 keeps
    assert gamma[: stream // 2].sum() >= gamma[stream // 2 :].sum()
    cfg = ModelConfig(name=ZOO, weights=str(path), sort="bn")
    assert model_kwargs_from_config(type("C", (), {"model": cfg})(), 7, 3)["sort"] == "bn"
    for bad, message in [({"name": "slim_resnet18", "sort": "bn"}, "is built slimmable"),
                         ({"name": ZOO, "sort": "taylor"}, "taylor needs data")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ModelConfig(**bad)
