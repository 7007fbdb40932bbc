"""Guards for a run's output folder: never overwrite another run, never keep stale temporary files.

``slimmable train`` calls :func:`check_output_dir` before it writes anything, and :func:`remove_stale_temporaries`
when it starts: a process killed (SIGKILL) during :func:`~slimmable.train.save_checkpoint` leaves its
``.last.pt.<pid>.tmp`` behind (the checkpoint itself is intact, the rename never happened).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

__all__ = ["RUN_FILES", "check_output_dir", "ensure_writable", "remove_stale_temporaries"]

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
