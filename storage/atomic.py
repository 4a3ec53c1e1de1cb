"""Crash-safe file writes: temporary file in the same folder, fsync, atomic rename, fsync of the folder."""

from __future__ import annotations

import os
from collections.abc import Callable
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


def remove_stale_tmp(root: Path) -> int:
    """Delete temporary files a killed process left behind under ``root``; returns how many."""
    n = 0
    if root.exists():
        for p in root.rglob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n
