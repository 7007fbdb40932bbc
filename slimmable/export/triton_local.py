"""A Triton model repository served on this machine by the Triton server that ``nvidia-pytriton`` bundles.

``pip install nvidia-pytriton`` ships a real ``tritonserver`` (with its Python backend, not its ONNX Runtime one)
that runs on a CPU. :class:`LocalTriton` starts it on a repository written with ``slimmable export --format triton
--triton-backend python``, the way pytriton starts it: the Python backend's stub for the models' Python version,
that Python's library folder on ``LD_LIBRARY_PATH`` and its ``bin`` first on ``PATH`` (the stub embeds that Python
and runs each ``model.py`` with its numpy and onnxruntime).

The models' Python is this one or the one given (``SLIMMABLE_TRITON_PYTHON`` in the tests and benchmarks): the stub
of nvidia-pytriton 0.7 is built against numpy 1.x, and with numpy 2 every model answers "output tensor shape does not
match size of output", so an environment with numpy 2 needs a separate one for the models::

    python3.11 -m venv triton-env && triton-env/bin/pip install 'numpy<2' onnxruntime

It is a tool for trying a repository without Docker, and for the tests and ``benchmarks/serve_slo.py``; production
runs NVIDIA's container (see the README).
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["LocalTriton", "TritonUnavailable", "bundled_triton", "models_python"]

PIP_HINT = "pip install nvidia-pytriton"


class TritonUnavailable(RuntimeError):
    """The bundled Triton cannot run here (not installed, or no suitable Python for the models); says why."""


def models_python(python: str | os.PathLike[str] | None = None) -> tuple[Path, str, str]:
    """The Python that runs the models: ``(executable, "major.minor", its library folder)``.

    Raises:
        TritonUnavailable: it cannot import numpy<2 and onnxruntime.
    """
    exe = Path(python) if python is not None else Path(sys.executable)
    probe = (
        "import sys, sysconfig, numpy; print(f'{sys.version_info.major}.{sys.version_info.minor}'); "
        "print(sysconfig.get_config_var('LIBDIR')); print(numpy.__version__); import onnxruntime"
    )
    try:
        out = subprocess.run([str(exe), "-c", probe], capture_output=True, text=True, timeout=120)
    except OSError as err:
        raise TritonUnavailable(f"{exe} cannot run: {err}") from None
    if out.returncode != 0:
        raise TritonUnavailable(f"{exe} cannot run the models (it needs numpy<2 and onnxruntime): "
                                f"{out.stderr.strip()[-300:]}")  # fmt: skip
    version, libdir, numpy_version = out.stdout.split()[:3]
    if int(numpy_version.split(".")[0]) >= 2:
        raise TritonUnavailable(
            f"{exe} has numpy {numpy_version}; the Python-backend stub of nvidia-pytriton is built against numpy 1.x "
            "(every model answers 'output tensor shape does not match size of output'): give a Python with "
            "numpy<2 and onnxruntime (SLIMMABLE_TRITON_PYTHON)"
        )
    return exe, version, libdir


def bundled_triton(version: str) -> tuple[Path, Path, Path]:
    """``(tritonserver binary, the Python backend folder, the stub for Python version)`` from nvidia-pytriton.

    Raises:
        TritonUnavailable: nvidia-pytriton is not installed, or has no stub for ``version``.
    """
    try:
        import pytriton
    except ImportError:
        raise TritonUnavailable(f"the Triton server of nvidia-pytriton is not installed: {PIP_HINT}") from None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    backend = dist / "backends" / "python"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():  # older pytriton: one stub, in the backend folder
        stub = backend / "triton_python_backend_stub"
    for path in (binary, backend, stub):
        if not path.exists():
            raise TritonUnavailable(
                f"pytriton {getattr(pytriton, '__version__', '?')} has no {path} (Python {version})"
            )
    return binary, backend, stub


def _libs_path() -> list[str]:
    try:
        from pytriton.utils.distribution import get_libs_path
    except ImportError:
        return []
    return [str(get_libs_path())]


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalTriton:
    """The bundled ``tritonserver`` on ``repository``, on loopback ports of its own, stopped on exit.

    Args:
        repository: a model repository (Python-backend models: the bundle has no ONNX Runtime backend).
        python: the models' Python (default this one; see the module docstring).
        threads: ``OMP_NUM_THREADS`` of the server and its models.
        start_timeout_s: how long to wait for readiness.

    Raises (on :meth:`start`):
        TritonUnavailable: see :func:`models_python` and :func:`bundled_triton`.
        RuntimeError: the server exited or was not ready in time (with the end of its log).
    """

    def __init__(
        self,
        repository: str | os.PathLike[str],
        *,
        python: str | os.PathLike[str] | None = None,
        threads: int = 1,
        start_timeout_s: float = 240.0,
    ) -> None:
        self.repository = Path(repository)
        self.python = python
        self.threads = int(threads)
        self.start_timeout_s = float(start_timeout_s)
        self.http_port = 0
        self.start_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._work: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """``host:port`` of its HTTP endpoint (what ``tritonclient.http`` takes)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        """The server's log file (kept until :meth:`stop`)."""
        assert self._work is not None, "the server was not started"
        return Path(self._work.name) / "tritonserver.log"

    def start(self) -> LocalTriton:
        """Start the server and wait until it is ready; returns ``self``."""
        if importlib.util.find_spec("pytriton") is None:  # before starting any process
            raise TritonUnavailable(f"the Triton server of nvidia-pytriton is not installed: {PIP_HINT}")
        python, version, libdir = models_python(self.python)
        binary, backend, stub = bundled_triton(version)
        self._work = tempfile.TemporaryDirectory(prefix="slimmable-triton-")
        work = Path(self._work.name)
        backends = work / "backends" / "python"
        backends.mkdir(parents=True)
        for f in backend.iterdir():  # the Python backend with the stub of the models' Python (as pytriton does)
            if f.name != "triton_python_backend_stub":
                (backends / f.name).symlink_to(f)
        shutil.copy(stub, backends / "triton_python_backend_stub")
        env = dict(os.environ)
        libs = [libdir, *_libs_path(), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
        env["PATH"] = f"{python.parent}:{env.get('PATH', '')}"
        env["OMP_NUM_THREADS"] = str(self.threads)
        self.http_port = _free_port()
        cmd = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={work / 'backends'}",
            f"--http-port={self.http_port}",
            f"--grpc-port={_free_port()}",
            f"--metrics-port={_free_port()}",
            "--allow-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--backend-config=python,shm-region-prefix-name=slimmable{os.getpid()}x{self.http_port}",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
        ]
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as out:
            self._proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        while not self._ready():
            if self._proc.poll() is not None:
                log = self._log_tail()
                self.stop()
                raise RuntimeError(f"tritonserver exited with {self._proc.returncode}:\n{log}")
            if time.perf_counter() - t0 > self.start_timeout_s:
                log = self._log_tail()
                self.stop()
                raise RuntimeError(f"tritonserver was not ready after {self.start_timeout_s:g} s:\n{log}")
            time.sleep(0.25)
        self.start_s = time.perf_counter() - t0
        return self

    def _ready(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
        try:
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server (terminate, then kill after 30 s) and remove its files."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._work is not None:
            self._work.cleanup()
            self._work = None

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
