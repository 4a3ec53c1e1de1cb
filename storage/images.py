"""Content-addressed image store: ``images/<ab>/<sha256>.<ext>`` under the build root."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .atomic import atomic_write_bytes

ALLOWED_EXT = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"})


def image_relpath(image_id: str, ext: str) -> str:
    """Where the store keeps an image, relative to the build root: ``images/<ab>/<sha256>.<ext>``."""
    return f"images/{image_id[:2]}/{image_id}.{ext}"


class PathEscapeError(ValueError):
    pass


class ImageStore:
    def __init__(self, build_root: Path):
        self.root = Path(build_root).resolve()

    def put(self, data: bytes, ext: str) -> tuple[str, str]:
        """Store bytes once; returns (image_id, path relative to the build root)."""
        ext = ext.lower().lstrip(".")
        if ext not in ALLOWED_EXT:
            raise ValueError(f"image extension {ext!r} not allowed; allowed: {sorted(ALLOWED_EXT)}")
        image_id = hashlib.sha256(data).hexdigest()
        rel = image_relpath(image_id, ext)
        final = self.resolve(rel)
        if not final.exists():
            atomic_write_bytes(final, data, crash_name="image.tmp_written")
        return image_id, rel

    def resolve(self, rel: str) -> Path:
        """Absolute path of a stored image; refuses any path that escapes the build root."""
        p = (self.root / rel).resolve()
        if not p.is_relative_to(self.root):
            raise PathEscapeError(f"image path {rel!r} escapes the build root {self.root}")
        return p

    def read(self, rel: str) -> bytes:
        return self.resolve(rel).read_bytes()
