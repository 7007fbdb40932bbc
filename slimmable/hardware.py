"""What this machine runs natively, and the numerics (precision, memory format) training uses on it.

CPUs differ more than their instruction sets suggest. On a CPU with native bfloat16 (AVX512-BF16 or AMX), bf16
autocast roughly halves a training step of our small convolutions; on an AVX2-only CPU the same bf16 is emulated
and was measured 6.6x *slower* than float32, and oneDNN's channels-last convolutions over 40x slower. So nothing
here is hard-coded: :func:`choose_numerics` decides per device at start-up, from the hardware flags and, where
they cannot tell, from a short measured probe of the real training step.

The AVX2 path can be reproduced on a newer CPU with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``;
:func:`cpu_native_bf16` honours both variables.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "Numerics",
    "choose_numerics",
    "cpu_native_bf16",
    "describe_machine",
    "machine_info",
    "speedup",
    "time_candidates",
    "time_step",
    "warm_up",
]

_logger = logging.getLogger(__name__)

#: oneDNN ISA names (``ONEDNN_MAX_CPU_ISA``) that still include native bf16 instructions
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10", "ALL")
#: an explicit setting this much slower than the best measured choice gets a warning
SLOW_FACTOR = 1.5
#: a candidate must be this much faster than float32/contiguous to be chosen over it (timing noise)
MIN_GAIN = 1.05
#: a warm-up has settled when two consecutive calls differ by at most this fraction
SETTLE = 0.15


def _cpu_flag(name: str) -> bool:
    fn = getattr(torch.cpu, f"_is_{name}_supported", None)  # private in torch 2.4-2.x; absent -> unknown = no
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU runs bfloat16 arithmetic natively, with the reason.

    Native means the processor has AVX512-BF16 or AMX *and* neither PyTorch's kernels (``ATEN_CPU_CAPABILITY``,
    seen in ``torch.backends.cpu.get_cpu_capability()``) nor oneDNN (``ONEDNN_MAX_CPU_ISA``) are limited below it.

    Returns:
        ``(native, reason)``, e.g. ``(False, "CPU capability AVX2: no AVX512-BF16/AMX")``.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    bf16, amx = _cpu_flag("avx512_bf16"), _cpu_flag("amx_tile")
    if not (bf16 or amx):
        return False, f"CPU capability {capability}: no AVX512-BF16/AMX instructions, so bf16 would be emulated"
    if not capability.startswith("AVX512"):
        return False, f"CPU capability limited to {capability} (ATEN_CPU_CAPABILITY): bf16 would be emulated"
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if isa and not isa.startswith(_ONEDNN_BF16_ISAS):
        return False, f"oneDNN limited to {isa} (ONEDNN_MAX_CPU_ISA): bf16 would be emulated"
    return True, f"CPU capability {capability} with native bf16 ({'AMX' if amx else 'AVX512-BF16'})"


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """The facts every benchmark and run records beside its numbers.

    Args:
        device: the device the numbers were taken on (default CPU).

    Returns:
        ``device``, ``cpu_model``, ``cpu_capability`` (``get_cpu_capability()``), ``native_bf16``, ``amx``,
        ``avx512_bf16``, ``onednn_max_cpu_isa`` (when set), ``threads``, ``torch``, ``torchvision``, ``python``,
        and for CUDA ``gpu`` and ``cuda_bf16``.
    """
    device = torch.device(device or "cpu")
    native, _ = cpu_native_bf16()
    info: dict[str, Any] = {
        "device": str(device),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native,
        "avx512_bf16": _cpu_flag("avx512_bf16"),
        "amx": _cpu_flag("amx_tile"),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if isa:
        info["onednn_max_cpu_isa"] = isa
    try:
        import torchvision

        info["torchvision"] = str(torchvision.__version__)
    except ImportError:  # pragma: no cover - a dependency
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_bf16"] = torch.cuda.is_bf16_supported()
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line: ``AVX512 CPU (native bf16: yes, AMX: yes), 2 threads, torch 2.5.1``."""
    yes = {True: "yes", False: "no"}
    line = (
        f"{info['cpu_capability']} CPU (native bf16: {yes[bool(info['native_bf16'])]}, AMX: {yes[bool(info['amx'])]}), "
        f"{info['threads']} threads, torch {info['torch']}"
    )
    if info.get("gpu"):
        line = f"{info['gpu']}; " + line
    return line


@dataclass(frozen=True)
class Numerics:
    """The precision and memory format a run uses, and why.

    Attributes:
        amp: ``off``, ``bf16`` or ``fp16`` (what ``train.amp`` resolved to).
        channels_last: NHWC memory format for model and inputs.
        reasons: ``{"amp": why, "channels_last": why}``.
        probe: measured seconds per training step of each candidate tried (``"bf16+channels_last"`` ...), when a
            probe ran.
        requested: the settings as configured (``auto`` or explicit).
    """

    amp: str
    channels_last: bool
    reasons: dict[str, str] = field(default_factory=dict)
    probe: dict[str, float] = field(default_factory=dict)
    requested: dict[str, Any] = field(default_factory=dict)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _dtype(self.amp)

    @property
    def use_grad_scaler(self) -> bool:
        return self.amp == "fp16"

    @property
    def label(self) -> str:
        return _label(self.amp, self.channels_last)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """``amp bf16 (why), channels_last off (why)``."""
        cl = "on" if self.channels_last else "off"
        return f"amp {self.amp} ({self.reasons['amp']}); channels_last {cl} ({self.reasons['channels_last']})"


def _label(amp: str, channels_last: bool) -> str:
    return ("fp32" if amp == "off" else amp) + ("+channels_last" if channels_last else "")


#: builds a zero-argument callable that runs one training step with (autocast dtype, channels_last)
StepFactory = Callable[[torch.dtype | None, bool], Callable[[], None]]


def warm_up(
    step: Callable[[], None], *, max_seconds: float, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    """Call ``step`` until its time settles; the seconds of each call.

    The first calls of a new configuration pay one-off costs (oneDNN creates its primitives for each shape, the
    allocator grows): a bf16 channels-last step was measured at 3.3 s on its first call and 0.17 s after. Calls go on
    until two in a row agree within :data:`SETTLE`, or ``max_seconds`` have passed. A first call longer than
    ``10 * max_seconds`` is not repeated: that path is slow whatever its set-up cost.
    """
    times: list[float] = []
    start = clock()
    while True:
        t = clock()
        step()
        times.append(clock() - t)
        if len(times) >= 2 and abs(times[-1] - times[-2]) <= SETTLE * min(times[-2:]):
            return times
        if clock() - start >= max_seconds or times[0] >= 10 * max_seconds:
            return times


def time_step(
    step: Callable[[], None],
    *,
    max_seconds: float = 1.5,
    max_steps: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Steady-state seconds per call of ``step``: :func:`warm_up`, then the median of up to ``max_steps`` timed calls
    within about ``max_seconds`` (at least one).

    When the warm-up never settled within ``max_seconds``, its last call is returned without more calls (enough to
    tell a path that is many times slower).
    """
    warm = warm_up(step, max_seconds=max_seconds, clock=clock)
    if len(warm) < 2 or abs(warm[-1] - warm[-2]) > SETTLE * min(warm[-2:]):
        return warm[-1]
    times: list[float] = []
    deadline = clock() + max_seconds
    while len(times) < max_steps and (not times or clock() < deadline):
        t = clock()
        step()
        times.append(clock() - t)
    return statistics.median(times)


def time_candidates(
    steps: Mapping[str, Callable[[], None]],
    *,
    seconds_per_candidate: float = 1.5,
    rounds: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Steady-state seconds per call of each of ``steps``, measured side by side.

    Each candidate is first warmed up until its time settles (:func:`warm_up`), so one-off costs are not counted.
    Then the candidates are timed in interleaved rounds, one call each per round: a load that comes and goes (a
    shared machine) slows every candidate of a round alike, so the comparison holds when the absolute times do not.
    At least three rounds run, at most ``rounds``, within about ``seconds_per_candidate`` per candidate. A candidate
    whose warm-up never settled because a single call took over ``10 * seconds_per_candidate`` is not timed again:
    its list holds that call only.

    Returns:
        ``{label: [seconds of round 1, round 2, ...]}`` in the order of ``steps``.
    """
    timed: dict[str, list[float]] = {}
    for label, step in steps.items():
        warm = warm_up(step, max_seconds=2 * seconds_per_candidate, clock=clock)
        timed[label] = [warm[-1]] if warm[0] >= 20 * seconds_per_candidate else []
    live = [label for label, t in timed.items() if not t]
    deadline = clock() + seconds_per_candidate * len(live)
    for r in range(rounds):
        for label in live:
            t = clock()
            steps[label]()
            timed[label].append(clock() - t)
        if r >= 2 and clock() >= deadline:
            break
    return timed


def speedup(candidate: list[float], reference: list[float]) -> float:
    """How many times faster ``candidate`` ran than ``reference``: the median over the rounds they were timed side by
    side (:func:`time_candidates`) of the per-round ratio, so a load that changes from one round to the next cancels
    out of each ratio."""
    ratios = [r / c for c, r in zip(candidate, reference) if c > 0]
    return statistics.median(ratios) if ratios else 1.0


def _dtype(amp: str) -> torch.dtype | None:
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def choose_numerics(
    amp: str,
    channels_last: bool | str,
    device: torch.device | str,
    make_step: StepFactory | None = None,
    *,
    probe_seconds: float = 1.5,
    clock: Callable[[], float] = time.perf_counter,
) -> Numerics:
    """Resolve ``train.amp`` and ``train.channels_last`` for ``device``; ``auto`` asks the hardware.

    CUDA: ``amp: auto`` is bf16 where the GPU supports it, else fp16 with a gradient scaler; ``channels_last: auto``
    is on with autocast (tensor cores prefer NHWC). CPU: bf16 is a candidate only with native support
    (:func:`cpu_native_bf16`) and channels-last only above AVX2 (oneDNN's NHWC kernels are far slower there);
    when more than one candidate remains and ``make_step`` is given, each is timed on the real training step in its
    steady state, side by side (:func:`time_candidates`); a candidate counts only when it is at least 5% faster than
    the simplest one (the median of the per-round ratios, :func:`speedup`), and of those the simplest within 5% of
    the fastest wins (float32 before bf16, contiguous before channels-last), so candidates within noise keep the
    simpler. Without ``make_step``, the flags decide: bf16
    where native, contiguous.

    An explicit setting always wins. With ``make_step``, it is timed against the float32/contiguous baseline and a
    warning gives the factor when it is at least 1.5x slower.

    Args:
        amp: ``auto``, ``off``, ``bf16`` or ``fp16``.
        channels_last: ``auto``, ``True`` or ``False``.
        device: the training device.
        make_step: builds one training step for (autocast dtype, channels_last); used for the probe only.
        probe_seconds: time budget per candidate (its warm-up may take twice that).
        clock: the timer (tests pass a fake one).

    Returns:
        The decision, with reasons and the probe's timings.

    Raises:
        ValueError: fp16 off CUDA, bf16 on a GPU without it, or an unknown value.
    """
    device = torch.device(device)
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"train.amp {amp!r} is not one of auto, off, bf16, fp16")
    if channels_last not in ("auto", True, False):
        raise ValueError(f"train.channels_last {channels_last!r} is not one of auto, true, false")
    cuda = device.type == "cuda"
    if amp == "fp16" and not cuda:
        raise ValueError(f"train.amp=fp16 needs a CUDA device, the device is {device}; use bf16, off or auto on CPU")
    if amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("train.amp=bf16: this GPU has no bfloat16 support; use fp16 or auto")
    requested = {"amp": amp, "channels_last": channels_last}
    reasons: dict[str, str] = {}
    if amp != "auto":
        reasons["amp"] = "set in the recipe"
    if channels_last != "auto":
        reasons["channels_last"] = "set in the recipe"

    if cuda:
        if amp == "auto":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            reasons["amp"] = f"auto: {torch.cuda.get_device_name(device)} " + (
                "supports bf16" if amp == "bf16" else "has no bf16; fp16 with a gradient scaler"
            )
        if channels_last == "auto":
            channels_last = amp != "off"
            reasons["channels_last"] = "auto: " + (
                "tensor cores prefer NHWC under autocast" if channels_last else "float32 on CUDA: NCHW"
            )
        return Numerics(amp, bool(channels_last), reasons, {}, requested)
    if device.type != "cpu":
        amp = "off" if amp == "auto" else amp
        channels_last = False if channels_last == "auto" else channels_last
        reasons.setdefault("amp", f"auto: no autocast policy for {device.type}")
        reasons.setdefault("channels_last", f"auto: NCHW on {device.type}")
        return Numerics(amp, bool(channels_last), reasons, {}, requested)

    native, why_bf16 = cpu_native_bf16()
    capability = torch.backends.cpu.get_cpu_capability()
    amp_options = [amp] if amp != "auto" else (["off", "bf16"] if native else ["off"])
    cl_options = [channels_last] if channels_last != "auto" else ([False, True] if native else [False])
    if amp == "auto" and not native:
        reasons["amp"] = f"auto: {why_bf16}"
    if channels_last == "auto" and not native:
        reasons["channels_last"] = (
            f"auto: CPU capability {capability}; oneDNN's channels-last convolutions are far slower than NCHW there"
        )
    # simplest first: float32 contiguous, bf16, channels-last, both; a later one must beat the one chosen before it
    candidates = sorted(((a, bool(c)) for a in amp_options for c in cl_options), key=lambda x: (x[1], x[0] != "off"))
    timed: dict[str, list[float]] = {}
    if make_step is not None and (len(candidates) > 1 or candidates[0] != ("off", False)):
        # the baseline first: an explicit setting is compared against it
        labels = {_label(a, c): (a, c) for a, c in [("off", False), *(x for x in candidates if x != ("off", False))]}
        steps = {label: make_step(_dtype(a), c) for label, (a, c) in labels.items()}
        timed = time_candidates(steps, seconds_per_candidate=probe_seconds, clock=clock)
    probe = {label: statistics.median(t) for label, t in timed.items()}
    if len(candidates) == 1:
        chosen = candidates[0]
        base = probe.get(_label("off", False))
        mine = probe.get(_label(*chosen))
        if base and mine and mine >= SLOW_FACTOR * base:
            _logger.warning(
                "train.amp=%s / train.channels_last=%s as set: the probe measured %s at %.1fx the time of float32 "
                "contiguous (%.3f s vs %.3f s per step) on this %s CPU; set both to auto to let the hardware decide",
                requested["amp"], requested["channels_last"], _label(*chosen), mine / base, mine, base, capability,
            )  # fmt: skip
        reasons.setdefault("amp", "auto")
        reasons.setdefault("channels_last", "auto")
        return Numerics(chosen[0], chosen[1], reasons, probe, requested)
    if probe:
        # a candidate must beat the simplest one by MIN_GAIN (noise); of those, the simplest within MIN_GAIN of the
        # fastest wins (two candidates within noise: the simpler)
        ref = _label(*candidates[0])
        gains = {c: speedup(timed[_label(*c)], timed[ref]) for c in candidates}
        winners = [c for c in candidates if c == candidates[0] or gains[c] >= MIN_GAIN]
        best = max(gains[c] for c in winners)
        chosen = next(c for c in winners if gains[c] * MIN_GAIN >= best)
        timings = ", ".join(f"{k} {v:.3f}s" for k, v in probe.items())
        why = (
            f"auto: fastest measured step on this {capability} CPU ({timings}; steady state, side by side; another "
            f"layout is chosen only when {MIN_GAIN - 1:.0%} faster)"
        )
    else:  # no probe: the flags decide
        chosen = ("bf16" if "bf16" in amp_options else amp_options[0], False if False in cl_options else cl_options[0])
        why = f"auto: {why_bf16}; not measured, contiguous by default"
    if amp == "auto":
        reasons["amp"] = why
    if channels_last == "auto":
        reasons.setdefault("channels_last", why)
    return Numerics(chosen[0], chosen[1], reasons, probe, requested)
