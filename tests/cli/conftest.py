"""Shared by the CLI tests: small fake Fashion-MNIST and an environment like CI's (no progress bars, a private
download cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_data import write_fashion_mnist


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("data") / "fm", n_train=96, n_test=48)


@pytest.fixture(autouse=True)
def _cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMMABLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CI", "true")
