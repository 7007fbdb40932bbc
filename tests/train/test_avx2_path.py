"""A short end-to-end training run on the AVX2 path, emulated on any x86 CPU with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``: the automatic numerics must pick float32 and contiguous tensors there (bf16 autocast was
measured 6.6x and channels-last over 40x slower than float32 on a real AVX2-only CPU)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from fake_data import tiny_recipe, write_fashion_mnist, write_recipe


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the AVX2 emulation is x86 only")
def test_auto_numerics_on_the_emulated_avx2_path(tmp_path: Path) -> None:
    fmnist = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=32)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(fmnist, train={"epochs": 1, "time_budget_min": 5.0}))
    out = tmp_path / "run"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "CI": "true"}
    env["SLIMMABLE_CACHE_DIR"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "slimmable.cli.main", "train", "--recipe", str(recipe), "--out", str(out),
           "--set", "train.amp=auto", "--set", "train.channels_last=auto", "--latency-runs", "0",
           "--no-tensorboard"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    hw = json.loads((out / "hardware.json").read_text())
    assert hw["machine"]["cpu_capability"] == "AVX2" and hw["machine"]["native_bf16"] is False
    assert hw["machine"]["onednn_max_cpu_isa"] == "AVX2"
    n = hw["numerics"]
    assert (n["amp"], n["channels_last"], n["probe"]) == ("off", False, {})
    # on a newer CPU: "limited to AVX2 (ATEN_CPU_CAPABILITY)"; on a real AVX2 CPU: "AVX2: no AVX512-BF16/AMX"
    assert "AVX2" in n["reasons"]["amp"] and "emulated" in n["reasons"]["amp"]
    assert "AVX2" in n["reasons"]["channels_last"]
    assert hw["plan"]["epochs"] == 1 and hw["plan"]["seconds_per_step"] > 0
    # the choice and its reason are printed when training starts, then timed progress with rate and ETA
    assert "numerics: amp off (auto: CPU capability " in log and "bf16 would be emulated" in log
    assert "machine: AVX2 CPU (native bf16: no" in log
    assert "steps/s, ETA" in log and "time budget: 1.00 epochs (3 steps) (the recipe's maximum) fit the 5-minute" in log
