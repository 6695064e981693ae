"""Helpers every layer may use: the package's version and folder, and atomic writes.

This module sits at the bottom of the package and imports nothing from gptc."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

VERSION = "0.1.0"
PACKAGE_DIR = Path(__file__).resolve().parent  # gptc/ (a checkout's or the installed one)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once: os.umask can only be read by setting it


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file so that readers see either the old content or the new, never half."""
    p = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new private folder under `parent` with the usual mode (mkdtemp makes 0700), to be
    filled and then renamed into place, so a reader never sees it half written."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~UMASK)
    return tmp


def first_file_in(path: str | os.PathLike) -> Path | None:
    """The first existing component of `path` that is not a directory (None: there is
    none, so the directory `path` can be made)."""
    p = Path(path)
    for part in (*reversed(p.parents), p):
        if part.exists() and not part.is_dir():
            return part
    return None


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity: taskset, a container's or a
    batch job's CPU set), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity on this platform (macOS)
        return os.cpu_count() or 1
