"""The wheel as users install it: built with ``python -m build``, installed into a fresh venv outside the repository,
where ``slimmable list`` shows the packaged recipes and ``slimmable train --recipe NAME`` trains on generated data.

The fresh venv has no system site-packages and only the wheel installed in it (``--no-deps``). Installing torch
there would take minutes and gigabytes, so a ``.pth`` file in it appends the site-packages folders that hold the
current environment's dependencies (torch, torchvision, ...) to ``sys.path``. Those folders are not the repository,
and the editable install's hook (a ``.pth`` file there) is not run, since only a venv's own site-packages has its
``.pth`` files processed: the test asserts that ``slimmable`` is imported from the venv.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_data import write_fashion_mnist

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# slimmable's dependencies and what they import, found where the running interpreter finds them
DEPENDENCIES = ("torch", "torchvision", "yaml", "tqdm", "tensorboard", "matplotlib", "numpy", "PIL")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _dependency_dirs() -> list[str]:
    """The site-packages folders of the current environment that hold slimmable's dependencies."""
    dirs: list[str] = []
    for name in DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"{name} is not installed; install slimmable with its dependencies"
        folder = Path(spec.origin).resolve().parent
        folder = folder.parent if spec.submodule_search_locations else folder  # a package: the folder above it
        if str(folder) not in dirs:
            dirs.append(str(folder))
    assert str(REPO) not in dirs, "the dependencies must not be found in the repository itself"
    return dirs


def _build_wheel(tmp_path: Path) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.fail("the PyPA builder is missing: pip install -e '.[dev]' (the dev extra brings build)")
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info into its source folder
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "slimmable", src / "slimmable", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(src)], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("slimmable-*.whl")
    return wheel


def test_wheel_installs_and_trains_outside_the_repository(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python, slimmable = venv / "bin" / "python", venv / "bin" / "slimmable"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
          str(wheel)], cwd=tmp_path)  # fmt: skip
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv).strip())
    (site / "_slimmable_test_dependencies.pth").write_text("\n".join(_dependency_dirs()) + "\n")

    work = tmp_path / "work"  # outside the repository: nothing there to import or read recipes from
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", CI="true",
               SLIMMABLE_CACHE_DIR=str(tmp_path / "cache"))  # fmt: skip
    probe = (
        "import json, importlib.metadata as md, slimmable, slimmable.recipes as r; "
        "print(json.dumps({'file': slimmable.__file__, 'licence': md.metadata('slimmable')['License-Expression'], "
        "'files': [str(f) for f in md.files('slimmable')], 'recipes': r.list_recipes()}))"
    )
    info = json.loads(_run([str(python), "-c", probe], work, env).strip().splitlines()[-1])
    installed = Path(info["file"]).resolve()
    assert installed.is_relative_to(venv.resolve()) and not installed.is_relative_to(REPO), info["file"]
    assert info["licence"] == "Apache-2.0" and any(f.endswith("licenses/LICENSE") for f in info["files"])
    assert "fmnist_slim_resnet18" in info["recipes"]
    packaged = [Path(f) for f in info["files"] if f.startswith("slimmable/recipes/") and f.endswith(".yaml")]
    assert sorted(p.stem for p in packaged) == info["recipes"]

    listed = _run([str(slimmable), "list"], work, env)
    assert "slim_resnet18" in listed and all(f"  {name} " in listed for name in info["recipes"])

    data = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=32)
    overrides = {
        "data.root": str(data),
        "data.download": "false",
        "data.val_size": "16",
        "data.batch_size": "16",
        "train.epochs": "1",
        "train.time_budget_min": "null",
        "train.amp": '"off"',  # explicit numerics, no start-up probe (quoted: YAML reads a bare off as false)
        "train.channels_last": "false",
    }
    cmd = [str(slimmable), "train", "--recipe", "fmnist_slim_resnet18", "--out", "run", "--latency-runs", "0",
           "--no-tensorboard", "--no-progress"]  # fmt: skip
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    out = _run(cmd, work, env)
    assert "slim_resnet18: test split" in out, out
    final = json.loads((work / "run" / "final_metrics.json").read_text())
    assert sorted(row["width"] for row in final["widths"]) == [0.0625, 0.125, 0.1875, 0.25]
    assert "stem_stride: 2" in (work / "run" / "config.yaml").read_text()  # the packaged recipe, overrides applied
