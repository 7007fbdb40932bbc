"""Issue 16: ``create_model`` refuses arguments that failed deep inside a model or built a broken one."""

from __future__ import annotations

import pytest

import slimmable


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((None,), {}, TypeError, r"needs a model name such as 'slim_mobilenet_v2', got None"),
        (("slim_mobilenet_v2",), {"widths": "0.5,1.0"}, ValueError, r"widths '0.5,1.0' is a string; give a sequence"),
        (("slim_mobilenet_v2",), {"num_classes": 0}, ValueError, r"num_classes must be an int >= 1, got 0"),
        (("slim_resnet18",), {"in_chans": 0}, ValueError, r"in_chans must be an int >= 1, got 0"),
        (("slim_mobilenet_v2",), {"num_classes": 2.5}, ValueError, r"num_classes must be an int >= 1, got 2.5"),
        (("slim_mobilenet_v2",), {"in_chans": True}, ValueError, r"in_chans must be an int >= 1, got True"),
    ],
)
def test_bad_arguments_are_named(args: tuple, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        slimmable.create_model(*args, **kwargs)


def test_valid_small_arguments_still_build() -> None:
    model = slimmable.create_model("slim_mobilenet_v1", num_classes=1, in_chans=1, widths=(0.5, 1.0))
    assert model.model_kwargs == {"num_classes": 1, "in_chans": 1, "widths": (0.5, 1.0)}


@pytest.mark.parametrize("name", ["us_mobilenet_v1", "us_mobilenet_v2"])
def test_us_builders_reject_switch_widths_instead_of_dropping_them(name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name} runs at any width in its width_range and takes no widths"):
        slimmable.create_model(name, widths=(0.5, 1.0), num_classes=10)
