"""Deterministic keys: hashes of content and stage config, so a re-run finds its own work."""

from __future__ import annotations

import hashlib


def stable_key(*parts: object, length: int = 20) -> str:
    """Hex digest of the parts, joined unambiguously.

    >>> stable_key("a", 1) == stable_key("a", 1), stable_key("a", 1) == stable_key("a1")
    (True, False)
    """
    h = hashlib.sha256()
    for p in parts:
        b = str(p).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:length]
