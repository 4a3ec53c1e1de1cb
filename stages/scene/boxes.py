"""Box math and box conventions, in one place.

refforge stores every box as ``(x1, y1, x2, y2)`` in pixels of the stored image (floats). Everything
that speaks another convention converts here:

* ``xywh``: ``(x, y, width, height)`` in pixels (COCO);
* a ``grid``: integers on a 0..``grid`` scale of each image side (0-1000 for Qwen2-VL, Kosmos-2,
  Shikra-style outputs);
* ``percent``: Label Studio's ``(x, y, width, height)`` in percent of the image size;
* text dialects for prompts and reasoning traces (:func:`format_box`).

Functions are vectorised over ``(N, 4)`` numpy arrays in the style of supervision's
``iou_and_nms``. The conversions keep the shape of what they are given: a single box (a
sequence of four numbers) comes back as a tuple of Python numbers, an ``(N, 4)`` array as an
``(N, 4)`` array. Integer outputs (grids, :func:`round_box`) round half away from zero, never to
even, so ``12.5`` becomes ``13`` in every module that prints a box.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "DIALECTS",
    "as_boxes",
    "box_area",
    "box_iou",
    "clip_boxes",
    "format_box",
    "from_grid",
    "from_percent",
    "iou",
    "round_box",
    "to_grid",
    "to_percent",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]

BoxLike = Sequence[float] | np.ndarray
Dialect = Literal["pixels", "grid1000", "pairs", "qwen_json"]
DIALECTS: tuple[str, ...] = ("pixels", "grid1000", "pairs", "qwen_json")


def as_boxes(boxes: BoxLike) -> np.ndarray:
    """``boxes`` as a float64 ``(N, 4)`` array (a single box becomes ``(1, 4)``).

    >>> as_boxes((1, 2, 3, 4))
    array([[1., 2., 3., 4.]])
    >>> as_boxes(np.zeros((0, 4))).shape
    (0, 4)
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"expected a box of 4 numbers or an (N, 4) array, got shape {np.shape(boxes)}")
    return arr


_NUMBER_TYPES = (float, int)
_BIG = float(2**62)


def _floats4(box) -> tuple[float, float, float, float] | None:
    """A single box of four finite Python numbers as floats (what ``as_boxes`` would hold), or None
    when the box is anything else (the numpy path then handles it, errors included)."""
    if (type(box) is not tuple and type(box) is not list) or len(box) != 4:
        return None
    a, b, c, d = box
    if type(a) not in _NUMBER_TYPES or type(b) not in _NUMBER_TYPES or type(c) not in _NUMBER_TYPES \
            or type(d) not in _NUMBER_TYPES:
        return None
    try:
        a, b, c, d = float(a), float(b), float(c), float(d)
    except OverflowError:
        return None
    s = a + b + c + d
    if s - s != 0.0:  # an inf or nan among them
        return None
    return a, b, c, d


def _round_single(box) -> tuple[int, int, int, int] | None:
    """``round_box`` of a single box of four Python numbers without numpy, or None (use numpy)."""
    v = _floats4(box)
    if v is None:
        return None
    out = []
    for x in v:
        m = abs(x)
        if m >= _BIG:
            return None
        r = math.floor(m + 0.5)
        out.append(-r if x < 0 else r)
    return out[0], out[1], out[2], out[3]


def _single(boxes: BoxLike) -> bool:
    return np.ndim(boxes) == 1


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def _out(arr: np.ndarray, single: bool, integer: bool = False):
    if integer:
        arr = arr.astype(np.int64)
    if single:
        return tuple(int(v) if integer else float(v) for v in arr[0])
    return arr


def box_area(boxes: BoxLike) -> np.ndarray:
    """Areas of ``(x1, y1, x2, y2)`` boxes; inverted boxes have area 0.

    >>> box_area([[0, 0, 10, 10], [5, 5, 4, 9]])
    array([100.,   0.])
    """
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(boxes_a: BoxLike, boxes_b: BoxLike, metric: Literal["iou", "ios"] = "iou") -> np.ndarray:
    """Pairwise overlap of two sets of ``(x1, y1, x2, y2)`` boxes, an ``(N, M)`` matrix.

    ``metric="iou"``: intersection over union. ``metric="ios"``: intersection over the *smaller*
    of the two areas (1.0 when one box lies inside the other). A pair whose denominator is 0
    (degenerate boxes) scores 0.

    >>> a = [[0, 0, 10, 10], [0, 0, 4, 4]]
    >>> b = [[5, 0, 15, 10], [0, 0, 10, 10]]
    >>> box_iou(a, b).round(4)
    array([[0.3333, 1.    ],
           [0.    , 0.16  ]])
    >>> box_iou(a, b, metric="ios").round(4)
    array([[0.5, 1. ],
           [0. , 1. ]])
    """
    if metric not in ("iou", "ios"):
        raise ValueError(f"metric must be 'iou' or 'ios', not {metric!r}")
    a, b = as_boxes(boxes_a), as_boxes(boxes_b)
    area_a, area_b = box_area(a), box_area(b)
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(br - tl, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    if metric == "iou":
        denom = area_a[:, None] + area_b[None, :] - inter
    else:
        denom = np.minimum(area_a[:, None], area_b[None, :])
    out = np.zeros_like(inter)
    np.divide(inter, denom, out=out, where=denom > 0)
    return out


def iou(box_a: BoxLike, box_b: BoxLike) -> float:
    """IoU of two single boxes.

    >>> iou((0, 0, 10, 10), (5, 5, 15, 15))
    0.14285714285714285
    >>> iou((0, 0, 10, 10), (20, 20, 30, 30))
    0.0
    """
    a = _floats4(box_a)
    b = _floats4(box_b) if a is not None else None
    if b is None:
        return float(box_iou(box_a, box_b)[0, 0])
    # the arithmetic of box_iou, in the same order, on Python floats (IEEE doubles as numpy's)
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    w = ax2 - ax1
    h = ay2 - ay1
    area_a = (w if w > 0 else 0.0) * (h if h > 0 else 0.0)
    w = bx2 - bx1
    h = by2 - by1
    area_b = (w if w > 0 else 0.0) * (h if h > 0 else 0.0)
    w = (ax2 if ax2 < bx2 else bx2) - (ax1 if ax1 > bx1 else bx1)
    h = (ay2 if ay2 < by2 else by2) - (ay1 if ay1 > by1 else by1)
    inter = (w if w > 0 else 0.0) * (h if h > 0 else 0.0)
    denom = area_a + area_b - inter
    return inter / denom if denom > 0 else 0.0


def xyxy_to_xywh(boxes: BoxLike):
    """``(x1, y1, x2, y2)`` to ``(x, y, width, height)``.

    >>> xyxy_to_xywh((10, 20, 30, 60))
    (10.0, 20.0, 20.0, 40.0)
    """
    b = as_boxes(boxes).copy()
    b[:, 2:] -= b[:, :2]
    return _out(b, _single(boxes))


def xywh_to_xyxy(boxes: BoxLike):
    """``(x, y, width, height)`` to ``(x1, y1, x2, y2)``.

    >>> xywh_to_xyxy(np.array([[10, 20, 20, 40]]))
    array([[10., 20., 30., 60.]])
    """
    b = as_boxes(boxes).copy()
    b[:, 2:] += b[:, :2]
    return _out(b, _single(boxes))


def clip_boxes(boxes: BoxLike, width: float, height: float):
    """Boxes clipped to the image ``[0, width] x [0, height]``.

    >>> clip_boxes((-5, 10, 700, 20), 640, 480)
    (0.0, 10.0, 640.0, 20.0)
    """
    b = as_boxes(boxes).copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, width)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, height)
    return _out(b, _single(boxes))


def round_box(boxes: BoxLike):
    """Integer pixel coordinates, rounded half away from zero (what traces and prompts print).

    >>> round_box((10.4, 10.5, 99.5, 100.49))
    (10, 11, 100, 100)
    """
    fast = _round_single(boxes)
    if fast is not None:
        return fast
    return _out(_round_half_away(as_boxes(boxes)), _single(boxes), integer=True)


def _scale(width: float, height: float) -> np.ndarray:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return np.array([width, height, width, height], dtype=np.float64)


def to_grid(boxes: BoxLike, width: float, height: float, grid: int = 1000):
    """Pixel boxes to integers on a ``0..grid`` scale of each side (clipped to the grid).

    >>> to_grid((64, 48, 320, 240), 640, 480)
    (100, 100, 500, 500)
    >>> to_grid(np.array([[0, 0, 640, 480]]), 640, 480, grid=100)
    array([[  0,   0, 100, 100]])
    """
    g = as_boxes(boxes) / _scale(width, height) * grid
    return _out(np.clip(_round_half_away(g), 0, grid), _single(boxes), integer=True)


def from_grid(boxes: BoxLike, width: float, height: float, grid: int = 1000):
    """Grid integers (``0..grid``) back to pixel boxes (floats).

    >>> from_grid((100, 100, 500, 500), 640, 480)
    (64.0, 48.0, 320.0, 240.0)
    """
    return _out(as_boxes(boxes) / grid * _scale(width, height), _single(boxes))


def to_percent(boxes: BoxLike, width: float, height: float):
    """Pixel ``(x1, y1, x2, y2)`` to Label Studio's ``(x, y, width, height)`` in percent.

    >>> to_percent((64, 48, 320, 240), 640, 480)
    (10.0, 10.0, 40.0, 40.0)
    """
    b = as_boxes(xyxy_to_xywh(as_boxes(boxes)))
    return _out(b / _scale(width, height) * 100.0, _single(boxes))


def from_percent(boxes: BoxLike, width: float, height: float):
    """Label Studio's percent ``(x, y, width, height)`` to pixel ``(x1, y1, x2, y2)``.

    >>> from_percent((10, 10, 40, 40), 640, 480)
    (64.0, 48.0, 320.0, 240.0)
    """
    b = as_boxes(boxes) / 100.0 * _scale(width, height)
    return _out(as_boxes(xywh_to_xyxy(b)), _single(boxes))


def format_box(box: BoxLike, dialect: Dialect = "pixels", width: float | None = None,
               height: float | None = None) -> str:
    """One pixel box as text in a dialect that prompts and traces use.

    * ``"pixels"``: ``[x1, y1, x2, y2]``, integer pixels (the ``<answer>`` form of refforge traces);
    * ``"grid1000"``: ``[x1, y1, x2, y2]`` on the 0-1000 grid (needs ``width`` and ``height``);
    * ``"pairs"``: ``(x1,y1),(x2,y2)``, integer pixels;
    * ``"qwen_json"``: ``{"bbox_2d": [x1, y1, x2, y2]}``, integer pixels (Qwen2.5-VL's absolute form).

    >>> b = (64.2, 47.6, 320, 240.5)
    >>> format_box(b)
    '[64, 48, 320, 241]'
    >>> format_box(b, "grid1000", width=640, height=480)
    '[100, 99, 500, 501]'
    >>> format_box(b, "pairs")
    '(64,48),(320,241)'
    >>> format_box(b, "qwen_json")
    '{"bbox_2d": [64, 48, 320, 241]}'
    """
    v = _round_single(box) if dialect != "grid1000" else None  # the common case, without numpy
    if v is None:
        if np.ndim(box) != 1:
            raise ValueError("format_box takes one box")
        if dialect == "grid1000":
            if width is None or height is None:
                raise ValueError("the grid1000 dialect needs the image width and height")
            v = to_grid(box, width, height, 1000)
        else:
            v = round_box(box)
    x1, y1, x2, y2 = v
    if dialect in ("pixels", "grid1000"):
        return f"[{x1}, {y1}, {x2}, {y2}]"
    if dialect == "pairs":
        return f"({x1},{y1}),({x2},{y2})"
    if dialect == "qwen_json":
        return json.dumps({"bbox_2d": [x1, y1, x2, y2]})
    raise ValueError(f"unknown box dialect {dialect!r}; expected one of {DIALECTS}")
