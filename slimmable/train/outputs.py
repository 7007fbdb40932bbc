"""Guards for a run's output folder: never overwrite another run, one run at a time, no stale temporary files.

``slimmable train`` calls :func:`check_output_dir` before it writes anything, takes the folder's lock
(:func:`lock_output_dir`, rank 0, for the whole run) and checks again under it, and calls
:func:`remove_stale_temporaries` when it starts: a process killed (SIGKILL) during
:func:`~slimmable.train.save_checkpoint` leaves its ``.last.pt.<pid>.tmp`` behind (the checkpoint itself is intact,
the rename never happened).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked (the refusal of another run's files still holds)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "RUN_FILES",
    "START_FILES",
    "RunLock",
    "check_output_dir",
    "ensure_writable",
    "lock_output_dir",
    "refuse_if_locked",
    "remove_stale_temporaries",
]

_logger = logging.getLogger(__name__)

#: the files a training run writes into its output folder (``tb/`` aside)
RUN_FILES = (
    "last.pt",
    "best.pt",
    "config.yaml",
    "history.json",
    "final_metrics.json",
    "final_metrics.csv",
    "hardware.json",
)

#: what a run writes before its first checkpoint: a folder holding only these (no last.pt, best.pt) lost nothing
#: worth keeping (e.g. a run that diverged in its first epoch), so a new run may start over in it
START_FILES = ("config.yaml", "hardware.json", "tb/")

#: the lock file of a running ``slimmable train`` (holds its process id); not one of a run's files
LOCK_NAME = ".slimmable.lock"

# every atomic write (slimmable._utils.atomic_path) goes through ".<name>.<pid>[-<thread>].tmp"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(-\d+)?\.tmp$")


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_output_dir(out_dir: str | os.PathLike[str], resume: str | os.PathLike[str] | None = None) -> None:
    """Refuse an output folder that would overwrite another run's results. Reads only; writes nothing.

    Allowed: a new or empty folder, or (with ``resume``) the folder of the checkpoint being resumed
    (``--resume B/last.pt --out B``).

    Args:
        out_dir: the run's output folder.
        resume: the checkpoint the run continues, if any.

    Raises:
        ValueError: ``out_dir`` is a file, or holds another run's files (the message names them and the fix).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give a folder for the run's outputs")
    if not out.is_dir():
        return
    present = [name for name in RUN_FILES if (out / name).exists()]
    if (out / "tb").is_dir():
        present.append("tb/")
    if not present:
        return
    files = ", ".join(present)
    if set(present) <= set(START_FILES):  # the start of a run that saved no checkpoint (it diverged, or was killed)
        _logger.warning(
            "--out %s holds only the start of a run that saved no checkpoint (%s); starting over there", out, files
        )
        return
    if resume is not None:
        ckpt = Path(resume)
        if _same_folder(ckpt.parent, out):
            return
        raise ValueError(
            f"--out {out} already holds another run's files ({files}); resuming {ckpt} there would overwrite them. "
            f"Resume in place (--resume {ckpt} without --out, writing to {ckpt.parent}), or give --out a new folder"
        )
    if (out / "last.pt").exists():
        fix = f"continue it with --resume {out / 'last.pt'}, or give --out a new folder"
    else:
        fix = "give --out a new folder, or move those files away first"
    raise ValueError(f"--out {out} already holds a run ({files}); {fix}")


class RunLock:
    """An exclusive ``flock`` on ``<out>/.slimmable.lock`` held for a whole run (released by :meth:`release`, or by
    the kernel when the process dies, so a lock left by a killed run never blocks)."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _held_error(out: Path, fd: int) -> ValueError:
    with contextlib.suppress(OSError):
        os.lseek(fd, 0, os.SEEK_SET)
    try:
        pid = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
    except OSError:
        pid = "?"
    return ValueError(
        f"--out {out} is in use by another slimmable train (process {pid}); wait for it to finish, stop it, or give "
        "--out another folder"
    )


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def refuse_if_locked(out_dir: str | os.PathLike[str]) -> None:
    """Refuse a folder another ``slimmable train`` is writing to now (its lock is held). Creates nothing.

    Raises:
        ValueError: the folder's lock is held; the message names the folder and the holding process id.
    """
    path = Path(out_dir) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        if not _try_lock(fd):
            raise _held_error(Path(out_dir), fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_output_dir(out_dir: str | os.PathLike[str]) -> RunLock:
    """Take the exclusive lock of a run's output folder (non-blocking), writing this process's id into it.

    Only rank 0 of a distributed run locks. Without ``fcntl`` (Windows) nothing is locked.

    Raises:
        ValueError: another process holds it (the message names the folder and that process's id).
    """
    path = Path(out_dir) / LOCK_NAME
    if fcntl is None:
        return RunLock(path, None)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_lock(fd):
        err = _held_error(Path(out_dir), fd)
        os.close(fd)
        raise err
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return RunLock(path, fd)


def ensure_writable(out_dir: str | os.PathLike[str]) -> Path:
    """Create ``out_dir`` and check that a file can be written there, before any data is loaded.

    Raises:
        OSError: the folder cannot be created or written (read-only, no permission, a path part is a file); the
            error names the path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-test.{os.getpid()}.tmp"
    try:
        probe.write_bytes(b"")
    finally:
        probe.unlink(missing_ok=True)
    return out


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files that an interrupted save left in ``out_dir`` (the process that wrote them is gone).

    A temporary ``.<name>.<pid>.tmp`` (checkpoints, JSON, YAML, CSV, plots) is removed when no process ``pid``
    runs; older releases' ``<name>.tmp`` of :data:`RUN_FILES` always (they were written and renamed at once).

    Returns:
        The removed paths.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return []
    removed = []
    names = {f"{n}.tmp" for n in RUN_FILES}
    for p in out.iterdir():
        m = _TEMPORARY.match(p.name)
        stale = (m is not None and not _pid_alive(int(m["pid"]))) or p.name in names
        if stale and p.is_file():
            try:
                p.unlink()
            except OSError as err:
                _logger.warning("could not remove the stale temporary file %s: %s", p, err)
                continue
            removed.append(p)
    if removed:
        names_removed = ", ".join(p.name for p in removed)
        _logger.info("removed %d stale temporary file(s) of an interrupted save: %s", len(removed), names_removed)
    return removed
