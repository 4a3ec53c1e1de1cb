"""Fast construction of frozen slotted dataclasses, for the stages' hot paths.

A frozen dataclass's ``__init__`` sets every field through ``object.__setattr__``; for a slotted one,
calling each slot's descriptor directly builds the same object in about half the time. That is only
the same object when ``__init__`` does nothing else, which :func:`slot_constructor` checks: for any
other class it returns the class itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

__all__ = ["slot_constructor"]


def slot_constructor(cls: type) -> Callable[..., Any]:
    """A function taking the fields of ``cls`` positionally, in field order (those with a default may
    be left out), that returns the instance ``cls(...)`` would, its slots set directly; ``cls`` itself
    unless ``cls`` is a slotted dataclass whose ``__init__`` only sets its fields (every field in
    ``__init__``, no default factory, no ``__post_init__``)."""
    fs = fields(cls) if is_dataclass(cls) else ()
    names = tuple(f.name for f in fs)
    if (not names or getattr(cls, "__slots__", None) != names or hasattr(cls, "__post_init__")
            or any(not f.init or f.default_factory is not MISSING for f in fs)
            or any(n in ("obj", "_new", "_cls") or n.startswith(("_set", "_default")) for n in names)):
        return cls
    # generated like dataclasses' own __init__: one descriptor call per slot, unrolled
    ns: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    params, body = [], []
    for k, f in enumerate(fs):
        ns[f"_set{k}"] = cls.__dict__[f.name].__set__
        if f.default is not MISSING:
            ns[f"_default{k}"] = f.default
            params.append(f"{f.name}=_default{k}")
        else:
            params.append(f.name)
        body.append(f"    _set{k}(obj, {f.name})")
    src = f"def build({', '.join(params)}):\n    obj = _new(_cls)\n" + "\n".join(body) + "\n    return obj\n"
    exec(src, ns)  # noqa: S102 - code generated from the dataclass's own field names
    build = ns["build"]
    build.__qualname__ = build.__name__ = f"build_{cls.__name__}"
    build.__doc__ = f"``{cls.__name__}(...)``, its slots set directly (see refforge.stages.scene.slots)."
    return build
