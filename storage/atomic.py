"""Crash-safe file writes: temporary file in the same folder, fsync, atomic rename, fsync of the folder."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from .faults import crash_point


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(final: Path) -> Path:
    """Hidden, unique temporary name beside ``final``; never matched by ``part-*.parquet`` globs."""
    return final.with_name(f".{final.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def atomic_write(final: Path, write: Callable[[BinaryIO], None], crash_name: str | None = None) -> Path:
    """Write through ``write(fileobj)`` so that ``final`` appears whole or not at all."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if crash_name:
            crash_point(crash_name)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return final


def atomic_write_bytes(final: Path, data: bytes, crash_name: str | None = None) -> Path:
    return atomic_write(final, lambda fh: fh.write(data), crash_name)


_TMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def tmp_writer(name: str) -> int | None:
    """The PID of the process that made a temporary file named by :func:`tmp_name`; None for any other
    name (a user's ``.notes.tmp`` is not refforge's)."""
    m = _TMP_NAME.match(name)
    return int(m.group(1)) if m else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process opens a build before it writes to it: a leftover of a dead one of that PID
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists (another user's process)
    return True


def remove_stale_tmp(root: Path, folders: Iterable[str] | None = None) -> int:
    """Delete the temporary files (named by :func:`tmp_name`) that a killed process left behind in
    ``folders`` of ``root`` (every folder under ``root`` when None); returns how many.

    Only refforge's own temporary names are touched, only those of processes that are gone (a writer
    still running, e.g. a review appending to the build, keeps its file), and symbolic links are not
    followed (a linked folder may lie outside the build)."""
    root = Path(root)
    tops = [root] if folders is None else [root / f for f in folders]
    n = 0
    for top in tops:
        if top.is_symlink() or not top.is_dir():
            continue
        for dirpath, _dirs, names in os.walk(top):
            n += sum(remove_if_stale(Path(dirpath) / name) for name in names)
    return n


def remove_if_stale(path: Path) -> bool:
    """Delete ``path`` if it is a temporary file (:func:`tmp_name`) of a process that is gone."""
    pid = tmp_writer(path.name)
    if pid is None or _alive(pid) or path.is_symlink() or not path.is_file():
        return False
    path.unlink(missing_ok=True)
    return True
