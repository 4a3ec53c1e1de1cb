"""Spatial relations computed from boxes alone.

``compute_relations(objects, width, height)`` derives the relation edges of a scene graph from the
objects' boxes ``(x1, y1, x2, y2)`` (pixels, ``x2``/``y2`` exclusive) and their names. It is pure and
deterministic. Predicates (exact strings, see ``PREDICATES``) and their rules, for an ordered pair of
distinct objects A (subject) and B (object), with ``tol_x = TOL_FRAC * width`` and
``tol_y = TOL_FRAC * height``:

``inside``
    B.name is in ``lexicon.CONTAINERS``, A's box lies within B's box up to ``INSIDE_TOL_FRAC`` of the
    image size on every side, and A's area is strictly smaller than B's. When A is inside B (or B inside
    A) no other relation is emitted between the two, in either direction.
``on``
    B.name is in ``lexicon.SUPPORTERS``, A's bottom edge is within ``ON_TOL_FRAC * height`` of B's top
    edge (``|A.y2 - B.y1| <= tol``), A's horizontal centre lies within B's x-range (closed), and A's
    vertical centre is above B's. When A is on B, no ``left of``/``right of``/``above``/``below``/
    ``next to`` is emitted between A and B in either direction. There is no ``under`` edge.
``left of`` / ``right of``
    A is entirely left of B (``A.x2 <= B.x1 + tol_x``), A's horizontal centre is left of B's, and the
    vertical extents overlap by at least ``MIN_OVERLAP`` (30%) of the smaller height (and by more than
    zero). ``right of`` is the exact inverse: A right of B iff B left of A.
``above`` / ``below``
    A is entirely above B (``A.y2 <= B.y1 + tol_y``), A's vertical centre is above B's, and the
    horizontal extents overlap by at least ``MIN_OVERLAP`` of the smaller width. ``below`` is the exact
    inverse.
``next to``
    Symmetric: A and B are in a ``left of``/``right of`` relation and the horizontal gap between them
    (which may be slightly negative, down to ``-tol_x``) is below ``NEXT_TO_GAP`` (0.5) times the smaller
    width. So ``next to`` always co-occurs with ``left of`` or ``right of``.

Output order: by subject position in ``objects``, then object position, then predicate position in
``PREDICATES``. Every rule uses only box differences, closed intervals and constants that do not depend
on x, so mirroring the image (``x -> width - x`` on every box) swaps ``left of``/``right of`` and leaves
every other edge unchanged (exactly, for coordinates that are exactly representable, e.g. pixels).
Objects whose names are in neither set still get directional relations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .graph import GObject, GRelation
from .lexicon import CONTAINERS, SUPPORTERS

PREDICATES: tuple[str, ...] = ("left of", "right of", "above", "below", "next to", "on", "inside")

TOL_FRAC = 0.01  # slack for "entirely left of / above", as a fraction of the image width / height
INSIDE_TOL_FRAC = 0.005  # slack for containment, as a fraction of the image width / height
ON_TOL_FRAC = 0.04  # |A.y2 - B.y1| allowed for "on", as a fraction of the image height
MIN_OVERLAP = 0.3  # required overlap on the other axis, as a fraction of the smaller extent
NEXT_TO_GAP = 0.5  # "next to": horizontal gap below this fraction of the smaller width


def _relation_matrices(
    boxes: np.ndarray, names: Sequence[str], width: int, height: int
) -> dict[str, np.ndarray]:
    """N x N boolean matrices, ``m[p][i, j]`` = "object i <p> object j"."""
    n = len(names)
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    w = x2 - x1
    h = y2 - y1
    cx = (x1 + x2) / 2.0
    cy = (y1 + y2) / 2.0
    col = (slice(None), None)  # subject i along rows
    row = (None, slice(None))  # object j along columns
    tol_x = TOL_FRAC * width
    tol_y = TOL_FRAC * height
    off_diag = ~np.eye(n, dtype=bool)

    # overlap of the extents on each axis (symmetric matrices)
    v_ov = np.minimum(y2[col], y2[row]) - np.maximum(y1[col], y1[row])
    h_ov = np.minimum(x2[col], x2[row]) - np.maximum(x1[col], x1[row])
    min_h = np.minimum(h[col], h[row])
    min_w = np.minimum(w[col], w[row])
    v_ok = (v_ov > 0) & (v_ov >= MIN_OVERLAP * min_h)
    h_ok = (h_ov > 0) & (h_ov >= MIN_OVERLAP * min_w)

    left = (x2[col] <= x1[row] + tol_x) & (cx[col] < cx[row]) & v_ok & off_diag
    above = (y2[col] <= y1[row] + tol_y) & (cy[col] < cy[row]) & h_ok & off_diag
    gap = x1[row] - x2[col]  # gap when i is left of j
    next_left = left & (gap < NEXT_TO_GAP * min_w)
    next_to = next_left | next_left.T

    is_container = np.array([nm in CONTAINERS for nm in names], dtype=bool)
    is_supporter = np.array([nm in SUPPORTERS for nm in names], dtype=bool)
    it_x = INSIDE_TOL_FRAC * width
    it_y = INSIDE_TOL_FRAC * height
    area = w * h
    inside = (
        (x1[col] >= x1[row] - it_x)
        & (x2[col] <= x2[row] + it_x)
        & (y1[col] >= y1[row] - it_y)
        & (y2[col] <= y2[row] + it_y)
        & (area[col] < area[row])
        & is_container[row]
        & off_diag
    )
    on = (
        (np.abs(y2[col] - y1[row]) <= ON_TOL_FRAC * height)
        & (cx[col] >= x1[row])
        & (cx[col] <= x2[row])
        & (cy[col] < cy[row])
        & is_supporter[row]
        & off_diag
    )
    inside_pair = inside | inside.T
    on = on & ~inside_pair
    blocked = inside_pair | on | on.T  # pairs without directional / next-to edges
    left = left & ~blocked
    above = above & ~blocked
    next_to = next_to & ~blocked
    return {
        "left of": left,
        "right of": left.T.copy(),
        "above": above,
        "below": above.T.copy(),
        "next to": next_to,
        "on": on,
        "inside": inside,
    }


def compute_relations(objects: Sequence[GObject], width: int, height: int) -> list[GRelation]:
    """Relations between every ordered pair of ``objects`` (rules in the module docstring)."""
    n = len(objects)
    if n < 2:
        return []
    boxes = np.array([o.box for o in objects], dtype=np.float64).reshape(n, 4)
    mats = _relation_matrices(boxes, [o.name for o in objects], width, height)
    stack = np.stack([mats[p] for p in PREDICATES], axis=-1)  # (n, n, P)
    ids = [o.id for o in objects]
    # np.nonzero walks in C order: subject, then object, then predicate index
    return [GRelation(ids[i], PREDICATES[k], ids[j]) for i, j, k in zip(*np.nonzero(stack), strict=True)]
