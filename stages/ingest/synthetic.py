"""The built-in synthetic source: seeded scenes of simple objects with exact boxes and attributes.

Offline and deterministic (numpy + PIL only). ``generate_scene(seed)`` lays out 3-12 objects of a few
categories from ``lexicon.CATEGORIES`` in a room (wall above, floor below), some standing on a table or
shelf, some inside a basket, box or bowl. It returns the scene graph (objects ``o0``, ``o1``, ... with
attributes ``(size, colour, pattern)``, relations from ``geometry.compute_relations``) plus a
JSON-serialisable ``spec`` holding everything else ``render`` needs.

``render(graph, spec)`` is a pure function of its arguments. Each object is painted from its mask, which
is a function of (name, box width, box height, spec["mirrored"]) only: the category's shape is drawn to
fill its box exactly, so the stored box is always the tight bounding box of the painted pixels
(``(xmin, ymin, xmax + 1, ymax + 1)``, integer-valued floats). Colour and pattern change the pixels but
never the mask. Objects are painted in the order supporters, containers, everything else (graph order
within each group), so only objects resting on a supporter or inside a container are drawn over another
object.

Layout: each scene uses 2-5 categories (so repeated categories are common) and small per-scene palettes
(2-3 colours, 1-3 patterns, 2-3 sizes). Sizes scale the category's nominal size (``NOMINAL``, fractions of
the image height) by ``SIZE_SCALE`` (small 0.62, medium 1.0, large 1.45, +-6% jitter), so the classes
never overlap. Tables and shelves are placed first, then baskets/boxes/bowls (possibly standing on a
table or shelf), then the rest: on a supporter (bottom edge on its top edge), inside a container (box
strictly inside its box, drawn over it) or free (floor objects with their bottom below the horizon,
shelves/kites/stars on the wall). Boxes never overlap except for "inside" pairs. An object inside a
container that stands on a table is usually also "on" the table by the geometric rule.

Edits (``remove_object``, ``set_attribute``, ``set_category``, ``mirror``) return a new ``(graph, spec)`` with relations
recomputed; inputs are never mutated. Rendering the result gives the edited image with exact boxes
again (box == tight bounds of the object's mask). A grown object (size edit) may overlap others: it is
still painted in ``draw_order``, so it can occlude, or be occluded by, a neighbour; its box stays the
bounds of its own mask, not of its visible pixels.

spec format (``spec["generator"] == "synthetic/v1"``)::

    {"generator": "synthetic/v1", "seed": <int>, "width": <int>, "height": <int>,
     "background": {"seed": <int>, "horizon": <float, fraction of height>,
                    "wall": [r, g, b], "floor": [r, g, b], "floor_style": "planks" | "tiles" | "carpet",
                    "wall_style": "plain" | "stripes", "noise": <float>, "grain": <float>},
     "mirrored": <bool>}
"""

from __future__ import annotations

import copy
import io
import json
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import deflate
import numpy as np
from PIL import Image, ImageDraw

from refforge.stages.scene.geometry import compute_relations
from refforge.stages.scene.graph import Box, GObject, SceneGraph
from refforge.stages.scene.lexicon import ATTRIBUTE_FAMILIES, CATEGORIES, CONTAINERS, SUPPORTERS

GENERATOR = "synthetic/v1"
FAMILIES: tuple[str, ...] = ("size", "colour", "pattern")
SIZE_SCALE: dict[str, float] = {"small": 0.62, "medium": 1.0, "large": 1.45}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (212, 38, 38),
    "orange": (246, 138, 28),
    "yellow": (246, 214, 46),
    "green": (46, 158, 66),
    "blue": (40, 88, 214),
    "purple": (132, 58, 184),
    "pink": (242, 128, 182),
    "brown": (128, 78, 38),
    "white": (246, 246, 246),
    "black": (26, 26, 26),
    "gray": (128, 128, 128),
}

# Nominal (width, height) of a medium object, as fractions of the image height.
NOMINAL: dict[str, tuple[float, float]] = {
    "ball": (0.11, 0.11),
    "kite": (0.14, 0.24),
    "star": (0.13, 0.125),
    "cup": (0.12, 0.09),
    "bottle": (0.06, 0.18),
    "vase": (0.09, 0.17),
    "bowl": (0.21, 0.10),
    "basket": (0.25, 0.21),
    "box": (0.20, 0.19),
    "book": (0.10, 0.13),
    "lamp": (0.14, 0.30),
    "table": (0.40, 0.22),
    "shelf": (0.40, 0.09),
    "plant": (0.15, 0.23),
    "hat": (0.17, 0.10),
    "umbrella": (0.22, 0.25),
}
# Categories that hang on the wall / fly: placed in the wall area; everything else stands on the floor.
WALL: frozenset[str] = frozenset({"shelf", "kite", "star"})
# Colour of the secondary part of a category (plant pot, lamp stand, ...), independent of attributes.
SECONDARY: dict[str, tuple[int, int, int]] = {
    "plant": (186, 98, 58),
    "lamp": (70, 70, 76),
    "umbrella": (64, 50, 44),
    "bottle": (60, 60, 64),
    "kite": (52, 52, 56),
    "book": (238, 232, 212),
}
_MAX_PER_CATEGORY: dict[str, int] = {"table": 2, "shelf": 2, "basket": 2, "box": 3, "bowl": 3, "lamp": 3}

_WALLS = [
    (222, 210, 186),
    (196, 214, 226),
    (206, 222, 198),
    (214, 214, 218),
    (236, 226, 206),
    (230, 200, 188),
]
_FLOORS = [(150, 112, 78), (120, 120, 124), (168, 140, 104), (92, 112, 116), (176, 164, 150), (110, 86, 70)]


@dataclass(frozen=True)
class SyntheticScene:
    graph: SceneGraph
    spec: dict


# ---------------------------------------------------------------------------------------------------
# Shapes: label maps drawn to fill a w x h box exactly
# ---------------------------------------------------------------------------------------------------

BODY, SECOND = 1, 3  # label values; 0 is "not part of the object"
Pt = tuple[float, float]


class _Pen:
    """Draws in unit coordinates ([0, 1] x [0, 1] -> the box's pixel grid) on a label and a detail layer."""

    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.labels = Image.new("L", (w, h), 0)
        self.detail = Image.new("L", (w, h), 0)
        self.d = ImageDraw.Draw(self.labels)
        self.dd = ImageDraw.Draw(self.detail)
        self.lw = max(1, round(min(w, h) * 0.06))

    def p(self, u: float, v: float) -> Pt:
        return (u * (self.w - 1), v * (self.h - 1))

    def pts(self, uv: list[Pt]) -> list[Pt]:
        return [self.p(u, v) for u, v in uv]

    def box(self, u0: float, v0: float, u1: float, v1: float) -> list[float]:
        (a, b), (c, e) = self.p(u0, v0), self.p(u1, v1)
        return [a, b, max(a, c), max(b, e)]

    def poly(self, uv: list[Pt], label: int = BODY) -> None:
        self.d.polygon(self.pts(uv), fill=label)

    def rect(self, u0: float, v0: float, u1: float, v1: float, label: int = BODY) -> None:
        self.d.rectangle(self.box(u0, v0, u1, v1), fill=label)

    def ellipse(self, u0: float, v0: float, u1: float, v1: float, label: int = BODY) -> None:
        self.d.ellipse(self.box(u0, v0, u1, v1), fill=label)

    def line(self, uv: list[Pt], label: int = BODY, width: int | None = None) -> None:
        self.d.line(self.pts(uv), fill=label, width=width or self.lw, joint="curve")

    def dline(self, uv: list[Pt], width: int | None = None) -> None:
        self.dd.line(self.pts(uv), fill=255, width=width or max(1, self.lw // 2 + 1), joint="curve")

    def dellipse(self, u0: float, v0: float, u1: float, v1: float, width: int | None = None) -> None:
        self.dd.ellipse(self.box(u0, v0, u1, v1), outline=255, width=width or max(1, self.lw // 2 + 1))

    def dpoly(self, uv: list[Pt]) -> None:
        self.dd.polygon(self.pts(uv), fill=255)


def _arc(cu: float, cv: float, ru: float, rv: float, a0: float, a1: float, n: int = 16) -> list[Pt]:
    """Points on an elliptical arc, angles in degrees (0 = +u, 90 = +v, i.e. downwards)."""
    ts = np.radians(np.linspace(a0, a1, n))
    return [(cu + ru * math.cos(t), cv + rv * math.sin(t)) for t in ts]


def _ball(p: _Pen) -> None:
    p.ellipse(0, 0, 1, 1)
    p.dline(_arc(0.5, 0.5, 0.2, 0.5, -90, 90))
    p.dline(_arc(0.5, 0.5, 0.2, 0.5, 90, 270))
    p.dline(_arc(0.5, 0.5, 0.5, 0.12, 0, 180))


def _kite(p: _Pen) -> None:
    diamond = [(0.5, 0.0), (1.0, 0.27), (0.5, 0.68), (0.0, 0.27)]
    tail = [(0.5, 0.66), (0.62, 0.76), (0.44, 0.86), (0.6, 1.0)]
    p.line(tail, SECOND, width=max(1, p.lw // 2 + 1))
    for u, v in tail[1:3]:
        p.poly(
            [(u - 0.08, v - 0.035), (u + 0.08, v + 0.035), (u + 0.08, v - 0.035), (u - 0.08, v + 0.035)],
            SECOND,
        )
    p.poly(diamond)
    p.dline([(0.5, 0.0), (0.5, 0.68)])
    p.dline([(0.0, 0.27), (1.0, 0.27)])


def _star(p: _Pen) -> None:
    ang = np.radians(-90 + 36 * np.arange(10))
    rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    xs, ys = rad * np.cos(ang), rad * np.sin(ang)
    us = (xs - xs.min()) / (xs.max() - xs.min())
    vs = (ys - ys.min()) / (ys.max() - ys.min())
    p.poly(list(zip(us.tolist(), vs.tolist(), strict=True)))


def _cup(p: _Pen) -> None:
    p.ellipse(0.56, 0.14, 1.0, 0.78)
    p.d.ellipse(p.box(0.67, 0.3, 0.89, 0.62), fill=0)
    p.poly([(0.0, 0.0), (0.76, 0.0), (0.7, 1.0), (0.06, 1.0)])
    p.dline([(0.0, 0.1), (0.76, 0.1)])


def _bottle(p: _Pen) -> None:
    p.rect(0.0, 0.4, 1.0, 1.0)
    p.poly([(0.0, 0.42), (0.3, 0.2), (0.7, 0.2), (1.0, 0.42)])
    p.rect(0.3, 0.08, 0.7, 0.22)
    p.rect(0.24, 0.0, 0.76, 0.1, SECOND)
    p.dline([(0.0, 0.58), (1.0, 0.58)])
    p.dline([(0.0, 0.84), (1.0, 0.84)])


def _vase(p: _Pen) -> None:
    vs = np.linspace(0.0, 1.0, 24)
    half = np.interp(vs, [0.0, 0.05, 0.22, 0.42, 0.6, 0.85, 1.0], [0.3, 0.25, 0.19, 0.42, 0.5, 0.4, 0.28])
    left = [(0.5 - r, v) for r, v in zip(half.tolist(), vs.tolist(), strict=True)]
    right = [(0.5 + r, v) for r, v in zip(half.tolist(), vs.tolist(), strict=True)]
    p.poly(left + right[::-1])
    p.dline(_arc(0.5, 0.42, 0.36, 0.05, 0, 180))


def _bowl(p: _Pen) -> None:
    p.rect(0.34, 0.84, 0.66, 1.0)
    p.poly([(0.0, 0.0), (1.0, 0.0)] + _arc(0.5, 0.0, 0.5, 0.9, 0, 180, 24))
    p.dellipse(0.02, 0.0, 0.98, 0.2)


def _basket(p: _Pen) -> None:
    p.line(_arc(0.5, 0.5, 0.36, 0.5, 180, 360, 20), width=max(2, p.lw))
    p.poly([(0.0, 0.42), (1.0, 0.42), (0.88, 1.0), (0.12, 1.0)])
    for k in range(1, 4):
        v = 0.42 + 0.58 * k / 4
        p.dline([(0.0, v), (1.0, v)])
    for k in range(1, 8):
        u = k / 8
        p.dline([(u, 0.42), (0.5 + (u - 0.5) * 0.8, 1.0)])


def _box(p: _Pen) -> None:
    p.rect(0.05, 0.14, 0.95, 1.0)
    p.rect(0.0, 0.0, 1.0, 0.2)
    p.dline([(0.0, 0.2), (1.0, 0.2)])
    p.dline([(0.5, 0.2), (0.5, 1.0)], width=max(1, p.lw))


def _book(p: _Pen) -> None:
    p.rect(0.82, 0.04, 1.0, 0.96, SECOND)
    p.rect(0.0, 0.0, 0.9, 1.0)
    p.dd.rectangle(p.box(0.0, 0.0, 0.16, 1.0), fill=255)
    p.dline([(0.32, 0.3), (0.76, 0.3)])
    p.dline([(0.32, 0.42), (0.66, 0.42)])
    for v in (0.3, 0.5, 0.7):
        p.dline([(0.9, v), (1.0, v)], width=1)


def _lamp(p: _Pen) -> None:
    p.rect(0.45, 0.36, 0.55, 0.93, SECOND)
    p.ellipse(0.2, 0.88, 0.8, 1.0, SECOND)
    p.poly([(0.22, 0.0), (0.78, 0.0), (1.0, 0.38), (0.0, 0.38)])
    p.dline([(0.11, 0.19), (0.89, 0.19)])


def _table(p: _Pen) -> None:
    p.rect(0.0, 0.0, 1.0, 0.13)
    p.rect(0.05, 0.1, 0.12, 1.0)
    p.rect(0.88, 0.1, 0.95, 1.0)
    p.rect(0.05, 0.12, 0.95, 0.22)
    p.dline([(0.0, 0.13), (1.0, 0.13)])


def _shelf(p: _Pen) -> None:
    p.rect(0.0, 0.0, 1.0, 0.32)
    p.poly([(0.1, 0.3), (0.24, 0.3), (0.1, 1.0)])
    p.poly([(0.9, 0.3), (0.76, 0.3), (0.9, 1.0)])
    p.dline([(0.0, 0.32), (1.0, 0.32)])


def _plant(p: _Pen) -> None:
    leaves = [(-60, 0.02, 0.48), (-25, 0.22, 0.6), (0, 0.5, 0.62), (25, 0.22, 0.6), (60, 0.02, 0.48)]
    for ang, _, length in leaves:
        a = math.radians(ang)
        bu, bv = 0.5, 0.62
        tu, tv = bu + length * 0.82 * math.sin(a), bv - length * math.cos(a)
        nu, nv = -(tv - bv) * 0.22, (tu - bu) * 0.22
        mu, mv = (bu + tu) / 2, (bv + tv) / 2
        p.poly([(bu, bv), (mu + nu, mv + nv), (tu, tv), (mu - nu, mv - nv)])
        p.dline([(bu, bv), (tu, tv)], width=1)
    p.poly([(0.26, 0.64), (0.74, 0.64), (0.67, 1.0), (0.33, 1.0)], SECOND)
    p.rect(0.22, 0.6, 0.78, 0.7, SECOND)


def _hat(p: _Pen) -> None:
    p.ellipse(0.0, 0.7, 1.0, 1.0)
    p.poly(
        [(0.24, 0.86), (0.26, 0.1)] + _arc(0.5, 0.1, 0.24, 0.1, 180, 360, 12) + [(0.74, 0.1), (0.76, 0.86)]
    )
    p.dd.rectangle(p.box(0.25, 0.58, 0.75, 0.74), fill=255)


def _umbrella(p: _Pen) -> None:
    top = _arc(0.5, 0.5, 0.5, 0.5, 180, 360, 28)
    scallops: list[Pt] = []
    for k in range(4, 0, -1):
        scallops += _arc(0.125 + 0.25 * (k - 1), 0.5, 0.125, 0.07, 0, 180, 8)
    p.poly(top + scallops)
    p.rect(0.48, 0.45, 0.53, 0.88, SECOND)
    p.line(_arc(0.43, 0.88, 0.1, 0.1, 0, 180, 10), SECOND, width=max(2, p.lw))
    for u in (0.25, 0.5, 0.75):
        p.dline([(0.5, 0.0), (u, 0.5)], width=1)


_SHAPES: dict[str, Callable[[_Pen], None]] = {
    "ball": _ball,
    "kite": _kite,
    "star": _star,
    "cup": _cup,
    "bottle": _bottle,
    "vase": _vase,
    "bowl": _bowl,
    "basket": _basket,
    "box": _box,
    "book": _book,
    "lamp": _lamp,
    "table": _table,
    "shelf": _shelf,
    "plant": _plant,
    "hat": _hat,
    "umbrella": _umbrella,
}


def _fit(arr: np.ndarray) -> np.ndarray:
    """Stretch ``arr`` so that its non-zero pixels touch all four borders (nearest neighbour)."""
    h, w = arr.shape
    rows = np.flatnonzero(arr.any(axis=1))
    cols = np.flatnonzero(arr.any(axis=0))
    if len(rows) == 0:
        return np.ones_like(arr)
    if rows[0] == 0 and rows[-1] == h - 1 and cols[0] == 0 and cols[-1] == w - 1:
        return arr
    crop = arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    ri = np.floor((np.arange(h) + 0.5) * crop.shape[0] / h).astype(int)
    ci = np.floor((np.arange(w) + 0.5) * crop.shape[1] / w).astype(int)
    return crop[ri][:, ci]


@lru_cache(maxsize=1024)
def _shape(name: str, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, detail) for a category drawn to fill a w x h box; labels in {0, BODY, SECOND}.

    The non-zero labels touch all four borders, so the box is the tight bounds of the mask.
    Unknown names are drawn as a filled rounded rectangle.
    """
    pen = _Pen(w, h)
    draw = _SHAPES.get(name)
    if draw is None:
        pen.d.rounded_rectangle([0, 0, w - 1, h - 1], radius=min(w, h) // 5, fill=BODY)
    else:
        draw(pen)
    labels = np.asarray(pen.labels, dtype=np.uint8)
    detail = np.asarray(pen.detail, dtype=np.uint8) > 0
    stacked = _fit(labels.astype(np.int16) * 2 + detail)  # fit both layers with the same mapping
    labels, detail = (stacked // 2).astype(np.uint8), (stacked % 2).astype(bool)
    detail &= labels > 0
    labels.flags.writeable = False
    detail.flags.writeable = False
    return labels, detail


def _int_box(box: Box) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def _object_mask(obj: GObject, spec: dict) -> np.ndarray:
    """Boolean mask of the pixels ``obj`` paints, in box-local coordinates (shape ``(h, w)``, origin at
    the box's top-left ``(x1, y1)``). Its tight bounds are the whole array, i.e. exactly ``obj.box``."""
    x1, y1, x2, y2 = _int_box(obj.box)
    labels, _ = _shape(obj.name, x2 - x1, y2 - y1)
    mask = labels > 0
    return mask[:, ::-1] if spec.get("mirrored") else mask


# ---------------------------------------------------------------------------------------------------
# Painting
# ---------------------------------------------------------------------------------------------------


def _attr(obj: GObject, family: str, default: str) -> str:
    values = ATTRIBUTE_FAMILIES[family]
    for a in obj.attributes:
        if a in values:
            return a
    return default


@lru_cache(maxsize=256)
def _pattern_mask(pattern: str, w: int, h: int) -> np.ndarray | None:
    """Where the pattern ink goes in a w x h box (box-local, unmirrored); None for "plain"."""
    if pattern not in ("striped", "dotted", "checkered"):
        return None
    period = max(5, round(min(w, h) / 4.5))
    yy = np.arange(h)[:, None]
    xx = np.arange(w)[None, :]
    if pattern == "striped":
        out = ((xx + yy) % period) < (period + 1) // 2
    elif pattern == "checkered":
        out = ((xx // period) + (yy // period)) % 2 == 0
    else:
        half = period / 2.0
        r = max(1.2, period * 0.28)
        out = ((xx % period - half + 0.5) ** 2 + (yy % period - half + 0.5) ** 2) <= r * r
    out.flags.writeable = False
    return out


@lru_cache(maxsize=512)
def _colour_table(name: str, colour: str) -> np.ndarray:
    """The (6, 3) float32 colours of an object's pixel classes: 0 body, 1 pattern ink, 2 secondary part,
    and 3-5 the same darkened for detail lines and the outline."""
    body = np.array(COLOURS.get(colour, COLOURS["gray"]), dtype=np.float32)
    second = np.array(SECONDARY.get(name, (90, 90, 90)), dtype=np.float32)
    lum = 0.299 * body[0] + 0.587 * body[1] + 0.114 * body[2]
    ink = body * 0.42 if lum > 150 else body * 0.45 + 255.0 * 0.55
    table = np.stack([body, ink, second, body * 0.55, ink * 0.55, second * 0.55])
    table.flags.writeable = False
    return table


@lru_cache(maxsize=256)
def _patch_cached(
    name: str, w: int, h: int, colour: str, pattern: str, mirrored: bool
) -> tuple[np.ndarray, np.ndarray]:
    labels, detail = _shape(name, w, h)
    mask = labels > 0
    table = _colour_table(name, colour)
    cls = (labels == SECOND).view(np.uint8) * np.uint8(2)
    pat = _pattern_mask(pattern, w, h)
    if pat is not None:
        np.copyto(cls, 1, where=pat & (labels == BODY))
    # darkened: detail lines and the outline (mask pixels on the border or next to a non-mask pixel)
    edge = mask.copy()
    edge[1:-1, 1:-1] &= ~(mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:])
    edge |= detail
    cls += edge.view(np.uint8) * np.uint8(3)
    shade = np.linspace(1.06, 0.9, h, dtype=np.float32)  # soft top-lit shading
    # A pixel's colour depends only on its row and class, so shade the table once per row and gather:
    # the same float32 products (clipped, truncated) as shading every pixel, without an (h, w, 3) pass.
    rows = table[None, :, :] * shade[:, None, None]
    np.clip(rows, 0, 255, out=rows)
    rows8 = rows.astype(np.uint8).reshape(h * len(table), 3)
    rgb8 = np.take(rows8, cls + (np.arange(h, dtype=np.intp) * len(table))[:, None], axis=0)
    if mirrored:
        rgb8, mask = np.ascontiguousarray(rgb8[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
    rgb8.flags.writeable = False
    mask.flags.writeable = False
    return rgb8, mask


def _object_patch(obj: GObject, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(rgb uint8 (h, w, 3), mask (h, w)) for ``obj`` in box-local coordinates, mirrored if the spec is.

    A pure function of (name, box size, colour, pattern, spec["mirrored"]); read-only (cached).
    """
    x1, y1, x2, y2 = _int_box(obj.box)
    return _patch_cached(
        obj.name,
        x2 - x1,
        y2 - y1,
        _attr(obj, "colour", "gray"),
        _attr(obj, "pattern", "plain"),
        bool(spec.get("mirrored", False)),
    )


def _upsample(low: np.ndarray, height: int, width: int) -> np.ndarray:
    img = Image.fromarray(low.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


@lru_cache(maxsize=8)
def _background_cached(bg_json: str, width: int, height: int, mirrored: bool) -> np.ndarray:
    """The room: wall above the horizon, floor below, as a read-only (H, W, 3) uint8 array.

    A luminance field (vertical gradients, two octaves of smooth noise, floor boards / tiles or wall
    stripes, a skirting band, 2x2-pixel grain) times the wall / floor colour. Everything is drawn from
    ``bg["seed"]``; the mirrored variant is the exact left-right flip.
    """
    bg = json.loads(bg_json)
    rng = np.random.default_rng(int(bg["seed"]))
    hz = min(max(int(round(float(bg["horizon"]) * height)), 1), height - 1)
    rows = np.arange(height, dtype=np.float32)
    row_lum = np.where(
        rows < hz, 1.07 - 0.12 * rows / hz, 0.84 + 0.22 * (rows - hz) / max(height - hz, 1)
    ).astype(np.float32)
    noise = float(bg["noise"])
    # two octaves of smooth noise, summed at low resolution and upsampled once
    gh, gw = max(2, height // 16), max(2, width // 16)
    coarse = _upsample(rng.standard_normal((5, 7)), gh, gw)
    fine = rng.standard_normal((gh, gw)).astype(np.float32)
    fine = 0.25 * (fine + np.roll(fine, 1, 0) + np.roll(fine, 1, 1) + np.roll(np.roll(fine, 1, 0), 1, 1))
    lum = _upsample(coarse * noise + fine * (noise * 0.6), height, width) + row_lum[:, None]  # a new array
    if bg.get("wall_style") == "stripes":
        period = max(8, width // int(rng.integers(10, 20)))
        lum[:hz, (np.arange(width) // period) % 2 == 1] += 0.035
    style = bg.get("floor_style", "planks")
    if style == "planks":
        # boards get wider towards the viewer; each has its own tone and staggered seams
        edges = np.round(hz + (height - hz) * (np.linspace(0.0, 1.0, 9) ** 1.4)).astype(int)
        tone = rng.normal(0.0, 0.035, 8)
        offsets = rng.integers(0, width, 8)
        seam_len = max(40, width // 3)
        for b in range(8):
            r0, r1 = int(edges[b]), int(edges[b + 1])
            if r1 <= r0:
                continue
            lum[r0:r1] += float(tone[b])
            lum[r0, :] -= 0.18
            first = int((seam_len - offsets[b] % seam_len) % seam_len)
            lum[r0:r1, first::seam_len] -= 0.15
    elif style == "tiles":
        tile = max(12, width // int(rng.integers(8, 14)))
        lum[hz:, ::tile] -= 0.1
        lum[hz :: max(tile // 2, 4), :] -= 0.1
    skirt = max(2, height // 90)
    lum[max(hz - skirt, 0) : hz + 1] *= 0.7
    # 2x2-pixel luminance grain: visible texture that still compresses
    gh2, gw2 = (height + 1) // 2, (width + 1) // 2
    grain = rng.standard_normal((gh2, gw2), dtype=np.float32) * (float(bg["grain"]) / 160.0)
    if height % 2 == 0:  # add each grain row to its two image rows through a view (lum is contiguous)
        pairs = lum.reshape(gh2, 2, width)
        pairs += np.repeat(grain, 2, axis=1)[:, None, :width]
    else:
        lum += np.repeat(np.repeat(grain, 2, axis=0), 2, axis=1)[:height, :width]
    base = np.where(
        (rows < hz)[:, None], np.array(bg["wall"], dtype=np.float32), np.array(bg["floor"], dtype=np.float32)
    )
    # one channel at a time: contiguous (H, W) float32 passes instead of an (H, W, 3) broadcast whose
    # innermost loop is 3 long; every value is the same float32 product, clipped and truncated as before
    out = np.empty((height, width, 3), dtype=np.uint8)
    plane = np.empty((height, width), dtype=np.float32)
    for c in range(3):
        np.multiply(lum, base[:, c : c + 1], out=plane)
        np.clip(plane, 0, 255, out=plane)
        out[:, :, c] = plane
    if mirrored:
        out = np.ascontiguousarray(out[:, ::-1])
    out.flags.writeable = False
    return out


def _background(spec: dict, width: int, height: int) -> np.ndarray:
    bg_json = json.dumps(spec["background"], sort_keys=True)
    return _background_cached(bg_json, int(width), int(height), bool(spec.get("mirrored", False)))


def _draw_rank(obj: GObject) -> int:
    if obj.name in SUPPORTERS:
        return 0
    if obj.name in CONTAINERS:
        return 1
    return 2


def draw_order(graph: SceneGraph) -> list[GObject]:
    """Objects in the order ``render`` paints them: supporters, containers, the rest (graph order within)."""
    indexed = sorted(enumerate(graph.objects), key=lambda io: (_draw_rank(io[1]), io[0]))
    return [o for _, o in indexed]


def render_array(graph: SceneGraph, spec: dict) -> np.ndarray:
    """``render`` as a writable (H, W, 3) uint8 array, for callers that go on in numpy (``encode_png``)."""
    width, height = int(graph.width), int(graph.height)
    canvas = np.array(_background(spec, width, height))
    for obj in draw_order(graph):
        x1, y1, x2, y2 = _int_box(obj.box)
        rgb, mask = _object_patch(obj, spec)
        # clip to the image (boxes produced here are always inside it)
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if cx1 >= cx2 or cy1 >= cy2:
            continue
        sub_m = mask[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
        sub_c = rgb[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
        np.copyto(canvas[cy1:cy2, cx1:cx2], sub_c, where=sub_m[:, :, None])
    return canvas


def render(graph: SceneGraph, spec: dict) -> Image.Image:
    """Paint the scene: background from ``spec``, then each object (see ``draw_order``). Pure."""
    return Image.fromarray(render_array(graph, spec), mode="RGB")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type by channel count: greyscale, RGB, RGBA (8 bits per sample)
_PNG_COLOUR_TYPE = {1: 0, 3: 2, 4: 6}
#: compression level of the image data (a zlib stream made by libdeflate, the ``deflate`` package pinned
#: in pyproject.toml: its output, and so every synthetic image id, is fixed by that version). At level 1
#: libdeflate compresses these images 2.4x faster than zlib at level 1, to files 7% smaller
#: (benchmarks/bench_ingest.py); a zlib decoder reads them as any PNG.
PNG_ZLIB_LEVEL = 1
_IDAT_CHUNK = 1 << 16  # bytes of compressed data per IDAT chunk, as Pillow writes them


def _png_chunk(kind: bytes, data: bytes | memoryview) -> bytes:
    return b"".join((len(data).to_bytes(4, "big"), kind, data,
                     zlib.crc32(data, zlib.crc32(kind)).to_bytes(4, "big")))


def encode_png(img: Image.Image | np.ndarray) -> bytes:
    """Deterministic PNG bytes of an 8-bit greyscale, RGB or RGBA image: no metadata, no filtering,
    libdeflate level ``PNG_ZLIB_LEVEL``. Decodes to exactly the input pixels.

    Written here rather than by Pillow because Pillow picks one of four PNG filters per row by trying all
    of them, which costs as much as the compression itself; on these images (smooth shading under
    per-pixel grain) that choice saves about 4% of the file, so rows go unfiltered (filter type 0).
    Other PIL modes (palette, 16-bit, 1-bit) are saved by Pillow at compress level 1.
    """
    if isinstance(img, Image.Image):
        if img.mode not in ("L", "RGB", "RGBA"):
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=1, optimize=False)
            return buf.getvalue()
        img = np.asarray(img)
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ValueError(f"encode_png takes an 8-bit (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, "
                         f"not {arr.dtype} {arr.shape}")
    height, width = arr.shape[:2]
    channels = arr.shape[2] if arr.ndim == 3 else 1
    if height < 1 or width < 1:
        raise ValueError(f"encode_png needs a non-empty image, not {width} x {height}")
    # each row of the image data is a filter-type byte (0: none) and the row's samples
    rows = np.empty((height, width * channels + 1), dtype=np.uint8)
    rows[:, 0] = 0
    rows[:, 1:] = arr.reshape(height, width * channels)
    data = memoryview(deflate.zlib_compress(rows, PNG_ZLIB_LEVEL))
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPE[channels], 0, 0, 0)
    return b"".join([_PNG_SIGNATURE, _png_chunk(b"IHDR", header),
                     *(_png_chunk(b"IDAT", data[i : i + _IDAT_CHUNK]) for i in range(0, len(data), _IDAT_CHUNK)),
                     _png_chunk(b"IEND", b"")])


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------

_CATEGORY_LIST: tuple[str, ...] = tuple(CATEGORIES)
_PLACE_TRIES = 40


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 < b[2] and b[0] < x2 and y1 < b[3] and b[1] < y2 for b in others)


def _object_size(name: str, size: str, rng: np.random.Generator, width: int, height: int) -> tuple[int, int]:
    nw, nh = NOMINAL[name]
    s = SIZE_SCALE[size] * float(rng.uniform(0.94, 1.06))
    w = int(round(nw * height * s * float(rng.uniform(0.95, 1.05))))
    h = int(round(nh * height * s))
    w = max(4, min(w, int(width * 0.9)))
    h = max(4, min(h, int(height * 0.9)))
    return w, h


def _background_spec(rng: np.random.Generator) -> dict[str, Any]:
    def jitter(c: tuple[int, int, int], amount: int) -> list[int]:
        return [int(np.clip(v + int(rng.integers(-amount, amount + 1)), 0, 255)) for v in c]

    return {
        "seed": int(rng.integers(0, 2**31 - 1)),
        "horizon": round(float(rng.uniform(0.42, 0.58)), 4),
        "wall": jitter(_WALLS[int(rng.integers(len(_WALLS)))], 12),
        "floor": jitter(_FLOORS[int(rng.integers(len(_FLOORS)))], 12),
        "floor_style": ("planks", "tiles", "carpet")[int(rng.integers(3))],
        "wall_style": ("plain", "stripes")[int(rng.integers(2))],
        "noise": round(float(rng.uniform(0.03, 0.07)), 4),
        "grain": round(float(rng.uniform(3.0, 7.0)), 4),
    }


def _choose_categories(rng: np.random.Generator, n_target: int) -> list[str]:
    k = int(rng.integers(2, 6))
    k = max(1, min(k, n_target))
    chosen: list[str] = []
    if rng.random() < 0.45:
        chosen.append(sorted(SUPPORTERS)[int(rng.integers(len(SUPPORTERS)))])
    if rng.random() < 0.45 and len(chosen) < k:
        chosen.append(sorted(CONTAINERS)[int(rng.integers(len(CONTAINERS)))])
    rest = [c for c in _CATEGORY_LIST if c not in chosen]
    extra = rng.choice(len(rest), size=k - len(chosen), replace=False)
    chosen += [rest[int(i)] for i in extra]
    return chosen


def _pick(rng: np.random.Generator, values: list[str]) -> str:
    return values[int(rng.integers(len(values)))]


def _layout(
    rng: np.random.Generator, width: int, height: int, horizon: float, min_objects: int, max_objects: int
):
    n_target = int(rng.integers(min_objects, max_objects + 1))
    cats = _choose_categories(rng, n_target)
    palettes = {
        "size": list(ATTRIBUTE_FAMILIES["size"]),
        "colour": [
            str(c) for c in rng.choice(ATTRIBUTE_FAMILIES["colour"], int(rng.integers(2, 4)), replace=False)
        ],
        "pattern": [str(c) for c in rng.choice(PATTERNS, int(rng.integers(1, 4)), replace=False)],
    }
    if rng.random() < 0.5:  # some scenes use only two sizes
        palettes["size"] = [str(c) for c in rng.choice(palettes["size"], 2, replace=False)]
    counts = dict.fromkeys(cats, 0)
    plan = list(cats)  # every chosen category at least once
    while len(plan) < n_target:
        c = _pick(rng, cats)
        if plan.count(c) < _MAX_PER_CATEGORY.get(c, 99):
            plan.append(c)
        elif all(plan.count(x) >= _MAX_PER_CATEGORY.get(x, 99) for x in cats):
            break
    plan.sort(key=lambda c: 0 if c in SUPPORTERS else 1 if c in CONTAINERS else 2)
    hz = int(round(horizon * height))
    placed: list[tuple[str, tuple[str, str, str], tuple[int, int, int, int]]] = []
    boxes: list[tuple[int, int, int, int]] = []
    supporters: list[int] = []
    containers: list[int] = []
    holds: dict[int, int] = {}  # container index -> number of objects inside

    def free_box(name: str, w: int, h: int) -> tuple[int, int, int, int] | None:
        if w >= width or h >= height:
            return None
        x1 = int(rng.integers(0, width - w + 1))
        if name in WALL:
            lo, hi = 2, hz - h - 4
            if hi < lo:
                return None
            y1 = int(rng.integers(lo, hi + 1))
        else:
            lo, hi = hz + max(4, height // 40), height
            if hi < lo:
                return None
            y2 = int(rng.integers(lo, hi + 1))
            y1 = y2 - h
            if y1 < 0:
                return None
        return (x1, y1, x1 + w, y1 + h)

    def on_box(w: int, h: int) -> tuple[tuple[int, int, int, int], int] | None:
        if not supporters:
            return None
        si = supporters[int(rng.integers(len(supporters)))]
        sx1, sy1, sx2, _ = boxes[si]
        if sx2 - sx1 < w + 4 or sy1 - h < 0:
            return None
        x1 = int(rng.integers(sx1 + 2, sx2 - w - 2 + 1))
        return (x1, sy1 - h, x1 + w, sy1), si

    def in_box(w: int, h: int) -> tuple[tuple[int, int, int, int], int] | None:
        if not containers:
            return None
        ci = containers[int(rng.integers(len(containers)))]
        cx1, cy1, cx2, cy2 = boxes[ci]
        m = max(2, int(round(0.06 * min(cx2 - cx1, cy2 - cy1))))
        if cx2 - cx1 - 2 * m < w or cy2 - cy1 - 2 * m < h or holds.get(ci, 0) >= 2:
            return None
        x1 = int(rng.integers(cx1 + m, cx2 - m - w + 1))
        y2 = int(rng.integers(max(cy1 + m + h, cy2 - m - max(2, (cy2 - cy1) // 6)), cy2 - m + 1))
        return (x1, y2 - h, x1 + w, y2), ci

    def place(name: str) -> bool:
        attrs = (
            _pick(rng, palettes["size"]),
            _pick(rng, palettes["colour"]),
            _pick(rng, palettes["pattern"]),
        )
        can_rest = name not in SUPPORTERS and name not in WALL
        can_hold = can_rest and name not in CONTAINERS
        mode_roll = rng.random()
        for attempt in range(_PLACE_TRIES):
            if attempt and attempt % 10 == 0:  # a different size may fit where this one does not
                attrs = (_pick(rng, palettes["size"]), attrs[1], attrs[2])
            w, h = _object_size(name, attrs[0], rng, width, height)
            box: tuple[int, int, int, int] | None = None
            host: int | None = None
            mode = "free"
            if attempt < _PLACE_TRIES // 2:
                if can_hold and containers and mode_roll < 0.4:
                    mode = "in"
                elif can_rest and supporters and mode_roll < 0.8:
                    mode = "on"
            if mode == "in":
                got = in_box(w, h)
                if got is not None:
                    box, host = got
            elif mode == "on":
                got = on_box(w, h)
                if got is not None:
                    box, host = got
            else:
                box = free_box(name, w, h)
            if box is None:
                continue
            others = [b for i, b in enumerate(boxes) if i != host or mode != "in"]
            if _overlaps(box, others):
                continue
            idx = len(boxes)
            boxes.append(box)
            placed.append((name, attrs, box))
            if name in SUPPORTERS:
                supporters.append(idx)
            if name in CONTAINERS:
                containers.append(idx)
            if mode == "in" and host is not None:
                holds[host] = holds.get(host, 0) + 1
            return True
        return False

    for name in plan:
        if len(placed) >= n_target:
            break
        if place(name):
            counts[name] += 1
    # top up with small categories of the scene if some did not fit
    fillers = [c for c in cats if c not in SUPPORTERS] or list(cats)
    budget = 3 * n_target
    while len(placed) < n_target and budget > 0:
        budget -= 1
        c = _pick(rng, fillers)
        if counts[c] < _MAX_PER_CATEGORY.get(c, 99) and place(c):
            counts[c] += 1
    return placed


def generate_scene(
    seed: int, *, width: int = 512, height: int = 384, min_objects: int = 3, max_objects: int = 12
) -> SyntheticScene:
    """A deterministic synthetic scene for ``seed`` (see the module docstring)."""
    if not 1 <= min_objects <= max_objects:
        raise ValueError("need 1 <= min_objects <= max_objects")
    rng = np.random.default_rng([int(seed) % 2**64, 0x5EED])
    background = _background_spec(rng)
    spec: dict[str, Any] = {
        "generator": GENERATOR,
        "seed": int(seed),
        "width": int(width),
        "height": int(height),
        "background": background,
        "mirrored": False,
    }
    placed = []
    for _ in range(50):
        placed = _layout(rng, width, height, background["horizon"], min_objects, max_objects)
        if len(placed) >= min_objects:
            break
    else:
        raise ValueError(f"could not place {min_objects} objects in a {width}x{height} image")
    # object ids in a seeded random order, so that ids carry no layout or category information;
    # render paints in draw_order regardless
    perm = rng.permutation(len(placed))
    objects = []
    for new_id, k in enumerate(perm.tolist()):
        name, attrs, box = placed[k]
        obj = GObject(id=f"o{new_id}", name=name, box=tuple(float(v) for v in box), attributes=attrs)
        objects.append(_exact(obj, spec))
    graph = SceneGraph(int(width), int(height), objects, compute_relations(objects, width, height))
    return SyntheticScene(graph=graph, spec=spec)


def _exact(obj: GObject, spec: dict) -> GObject:
    """``obj`` with its box replaced by the tight bounds of its mask (a no-op by construction)."""
    x1, y1, _, _ = _int_box(obj.box)
    mask = _object_mask(obj, spec)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = (float(x1 + cols[0]), float(y1 + rows[0]), float(x1 + cols[-1] + 1), float(y1 + rows[-1] + 1))
    return obj if box == tuple(obj.box) else replace(obj, box=box)


# ---------------------------------------------------------------------------------------------------
# Edits
# ---------------------------------------------------------------------------------------------------


def _rebuild(graph: SceneGraph, objects: list[GObject]) -> SceneGraph:
    return graph.with_objects(objects, compute_relations(objects, graph.width, graph.height))


def _find(graph: SceneGraph, object_id: str) -> int:
    for i, o in enumerate(graph.objects):
        if o.id == object_id:
            return i
    raise KeyError(f"no object {object_id!r} in the graph")


def remove_object(graph: SceneGraph, spec: dict, object_id: str) -> tuple[SceneGraph, dict]:
    """The scene without ``object_id``. Objects resting on or inside it stay where they are."""
    i = _find(graph, object_id)
    objects = graph.objects[:i] + graph.objects[i + 1 :]
    return _rebuild(graph, objects), copy.deepcopy(spec)


def set_category(graph: SceneGraph, spec: dict, object_id: str, category: str) -> tuple[SceneGraph, dict]:
    """The scene with one object drawn as another category in the same box: the new category's shape
    fills the old box (so the box can only shrink to the new mask's tight bounds); attributes are kept.
    ``category`` must be one the renderer draws (``NOMINAL``)."""
    if category not in NOMINAL:
        raise ValueError(f"the synthetic renderer cannot draw {category!r}; it draws {sorted(NOMINAL)}")
    i = _find(graph, object_id)
    objects = list(graph.objects)
    objects[i] = _exact(replace(objects[i], name=category), spec)
    return _rebuild(graph, objects), copy.deepcopy(spec)


def _resized_box(box: Box, factor: float, width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = _int_box(box)
    w = max(4, int(round((x2 - x1) * factor)))
    h = max(4, int(round((y2 - y1) * factor)))
    if w > width or h > height:  # keep the aspect ratio while fitting the image
        s = min(width / w, height / h)
        w, h = max(1, int(w * s)), max(1, int(h * s))
    cx2 = x1 + x2  # twice the bottom centre, to stay in integers
    nx1 = (cx2 - w) // 2
    ny2 = y2
    nx1 = min(max(nx1, 0), width - w)
    ny2 = min(max(ny2, h), height)
    return nx1, ny2 - h, nx1 + w, ny2


def set_attribute(
    graph: SceneGraph, spec: dict, object_id: str, family: str, value: str
) -> tuple[SceneGraph, dict]:
    """The scene with one attribute of one object changed.

    ``family`` is one of ``"size"``, ``"colour"``, ``"pattern"``. A size change rescales the box by the
    ratio of the size scales (``SIZE_SCALE``) around its bottom centre, shifted (not cropped) into the
    image; the new box is again the exact bounds of what ``render`` paints. Other objects do not move.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown attribute family {family!r}; expected one of {FAMILIES}")
    if value not in ATTRIBUTE_FAMILIES[family]:
        raise ValueError(f"{value!r} is not a {family} value")
    i = _find(graph, object_id)
    obj = graph.objects[i]
    values = ATTRIBUTE_FAMILIES[family]
    old = next((a for a in obj.attributes if a in values), None)
    if old is None:
        attrs = obj.attributes + (value,)
    else:
        attrs = tuple(value if a == old else a for a in obj.attributes)
    new = replace(obj, attributes=attrs)
    if family == "size" and old is not None and old != value:
        box = _resized_box(obj.box, SIZE_SCALE[value] / SIZE_SCALE[old], graph.width, graph.height)
        new = _exact(replace(new, box=tuple(float(v) for v in box)), spec)
    objects = list(graph.objects)
    objects[i] = new
    return _rebuild(graph, objects), copy.deepcopy(spec)


def mirror(graph: SceneGraph, spec: dict) -> tuple[SceneGraph, dict]:
    """The horizontally flipped scene: every box ``x -> width - x`` and ``spec["mirrored"]`` toggled, so
    ``render(*mirror(g, s))`` equals ``render(g, s)`` flipped left-right."""
    w = graph.width
    objects = [replace(o, box=(w - o.box[2], o.box[1], w - o.box[0], o.box[3])) for o in graph.objects]
    new_spec = copy.deepcopy(spec)
    new_spec["mirrored"] = not bool(spec.get("mirrored", False))
    return _rebuild(graph, objects), new_spec
