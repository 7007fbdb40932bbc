"""The numerics decision (slimmable.hardware) with the hardware flags and the probe's timings mocked."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest
import torch

from slimmable import hardware
from slimmable.hardware import choose_numerics, cpu_native_bf16, describe_machine, machine_info, time_step


def _cpu(monkeypatch: pytest.MonkeyPatch, capability: str, bf16: bool, amx: bool = False) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(hardware, "_cpu_flag", lambda name: {"avx512_bf16": bf16, "amx_tile": amx}[name])
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


def _probe(monkeypatch: pytest.MonkeyPatch, seconds: dict[str, float]) -> tuple[Callable, list[str]]:
    """A make_step whose steps 'take' the given seconds per label, and the labels it was asked for."""
    asked: list[str] = []

    def make_step(dtype: torch.dtype | None, channels_last: bool) -> Callable[[], None]:
        label = hardware._label({None: "off", torch.bfloat16: "bf16"}[dtype], channels_last)
        asked.append(label)

        def step() -> None:
            pass

        step.label = label  # type: ignore[attr-defined]
        return step

    monkeypatch.setattr(hardware, "time_step", lambda step, **kw: seconds[step.label])
    return make_step, asked


def test_native_bf16_needs_the_instructions_and_no_isa_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, "AVX2", bf16=False)
    native, why = cpu_native_bf16()
    assert not native and "no AVX512-BF16/AMX" in why
    _cpu(monkeypatch, "AVX2", bf16=True, amx=True)  # ATEN_CPU_CAPABILITY=avx2 on a newer CPU
    native, why = cpu_native_bf16()
    assert not native and "limited to AVX2" in why
    _cpu(monkeypatch, "AVX512", bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    native, why = cpu_native_bf16()
    assert not native and "oneDNN limited to AVX2" in why
    _cpu(monkeypatch, "AVX512", bf16=False, amx=True)
    assert cpu_native_bf16() == (True, "CPU capability AVX512 with native bf16 (AMX)")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_native_bf16()[0]


def test_avx2_auto_is_float32_contiguous_without_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, "AVX2", bf16=False)
    make_step, asked = _probe(monkeypatch, {})
    n = choose_numerics("auto", "auto", "cpu", make_step)
    assert (n.amp, n.channels_last, n.autocast_dtype, n.use_grad_scaler) == ("off", False, None, False)
    assert asked == [] and n.probe == {}
    assert "AVX2" in n.reasons["amp"] and "emulated" in n.reasons["amp"]
    assert "AVX2" in n.reasons["channels_last"] and "slower" in n.reasons["channels_last"]


def test_native_auto_takes_the_fastest_measured_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, "AVX512", bf16=True, amx=True)
    timings = {"fp32": 1.0, "fp32+channels_last": 0.9, "bf16": 0.5, "bf16+channels_last": 0.6}
    make_step, asked = _probe(monkeypatch, timings)
    n = choose_numerics("auto", "auto", "cpu", make_step)
    assert (n.amp, n.channels_last) == ("bf16", False) and n.autocast_dtype == torch.bfloat16
    assert sorted(asked) == sorted(timings) and n.probe == timings
    assert "fastest measured" in n.reasons["amp"] and "bf16 0.500s" in n.reasons["amp"]
    # a gain within the noise (< 5%) keeps float32 / contiguous
    make_step, _ = _probe(monkeypatch, {"fp32": 1.0, "fp32+channels_last": 0.97, "bf16": 0.96, "bf16+channels_last": 2})
    assert choose_numerics("auto", "auto", "cpu", make_step).label == "fp32"
    # channels_last fixed, amp auto: only amp is probed
    make_step, asked = _probe(monkeypatch, {"fp32": 1.0, "fp32+channels_last": 0.8, "bf16+channels_last": 0.4})
    n = choose_numerics("auto", True, "cpu", make_step)
    assert n.label == "bf16+channels_last" and n.reasons["channels_last"] == "set in the recipe"
    assert asked == ["fp32", "fp32+channels_last", "bf16+channels_last"]


def test_native_without_probe_follows_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, "AVX512", bf16=True)
    n = choose_numerics("auto", "auto", "cpu")
    assert (n.amp, n.channels_last) == ("bf16", False) and "not measured" in n.reasons["amp"]


def test_explicit_setting_wins_and_a_slow_one_is_warned(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _cpu(monkeypatch, "AVX2", bf16=False)
    make_step, asked = _probe(monkeypatch, {"fp32": 2.25, "bf16+channels_last": 14.9})
    with caplog.at_level(logging.WARNING, logger="slimmable.hardware"):
        n = choose_numerics("bf16", True, "cpu", make_step)
    assert (n.amp, n.channels_last) == ("bf16", True) and n.reasons == {
        "amp": "set in the recipe",
        "channels_last": "set in the recipe",
    }
    assert asked == ["fp32", "bf16+channels_last"]
    assert "6.6x the time of float32" in caplog.text and "set both to auto" in caplog.text
    caplog.clear()
    make_step, _ = _probe(monkeypatch, {"fp32": 1.0, "fp32+channels_last": 1.2})
    with caplog.at_level(logging.WARNING, logger="slimmable.hardware"):
        choose_numerics("off", True, "cpu", make_step)
    assert caplog.text == ""  # 1.2x: not "much slower"


def test_cuda_auto_and_impossible_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    n = choose_numerics("auto", "auto", "cuda")
    assert (n.amp, n.channels_last, n.use_grad_scaler) == ("bf16", True, False) and "Fake GPU" in n.reasons["amp"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    n = choose_numerics("auto", False, "cuda")
    assert (n.amp, n.channels_last, n.use_grad_scaler) == ("fp16", False, True)
    with pytest.raises(ValueError, match="no bfloat16 support"):
        choose_numerics("bf16", "auto", "cuda")
    with pytest.raises(ValueError, match="train.amp=fp16 needs a CUDA device"):
        choose_numerics("fp16", "auto", "cpu")
    with pytest.raises(ValueError, match="train.amp 'half' is not one of"):
        choose_numerics("half", "auto", "cpu")


def test_time_step_stops_at_a_slow_first_call() -> None:
    calls = []
    assert time_step(lambda: calls.append(1), max_seconds=0.05, max_steps=3) >= 0
    assert 2 <= len(calls) <= 4  # one warm-up, then at most max_steps
    slow = []

    def step() -> None:
        slow.append(1)
        torch.randn(1)
        import time

        time.sleep(0.06)

    assert time_step(step, max_seconds=0.05) >= 0.06 and len(slow) == 1


def test_machine_info_is_plain_json() -> None:
    info = machine_info()
    for key in ("cpu_capability", "native_bf16", "amx", "threads", "torch", "cpu_model"):
        assert key in info
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert json.loads(json.dumps(info)) == info
    assert info["cpu_capability"] in describe_machine(info) and "threads" in describe_machine(info)
