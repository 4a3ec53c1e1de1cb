"""Box math: IoU / IoS matrices against hand-computed values, conversions round-trip, dialects, doctests."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refforge.stages.scene import boxes as B


def test_doctests_run():
    result = doctest.testmod(B, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 15
    assert result.failed == 0


def test_iou_matrix_by_hand():
    a = np.array([[0, 0, 10, 10], [10, 10, 20, 20], [0, 0, 2, 2]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]], dtype=float)
    # a0 vs b1: inter 25, union 175; a1 vs b1: inter 25, union 175; a2 vs b0: inter 4, union 100
    expected = np.array([
        [1.0, 25 / 175, 0.0],
        [0.0, 25 / 175, 0.0],   # touching at a corner is no overlap
        [4 / 100, 0.0, 0.0],
    ])
    got = B.box_iou(a, b)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_ios_matrix_by_hand():
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 2]], dtype=float)
    b = np.array([[5, 5, 15, 15], [0, 0, 100, 100]], dtype=float)
    expected = np.array([
        [25 / 100, 100 / 100],   # a0 inside b1: intersection over the smaller (a0) is 1
        [0.0, 4 / 4],
    ])
    np.testing.assert_allclose(B.box_iou(a, b, metric="ios"), expected, atol=1e-12)


def test_iou_symmetric_and_degenerate():
    a = np.array([[0, 0, 4, 6], [3, 1, 9, 2], [5, 5, 5, 9]], dtype=float)  # the last has zero area
    m = B.box_iou(a, a)
    np.testing.assert_allclose(m, m.T)
    assert m[0, 0] == 1.0 and m[1, 1] == 1.0
    assert m[2, 2] == 0.0 and not np.isnan(m).any()
    assert B.box_iou(np.zeros((0, 4)), a).shape == (0, 3)
    with pytest.raises(ValueError):
        B.box_iou(a, a, metric="dice")  # type: ignore[arg-type]


def test_scalar_iou_matches_matrix():
    assert B.iou((0, 0, 10, 10), (0, 0, 10, 20)) == pytest.approx(0.5)
    assert B.iou((0, 0, 10, 10), (0, 0, 10, 20)) == B.box_iou([(0, 0, 10, 10)], [(0, 0, 10, 20)])[0, 0]


def test_xywh_round_trip_and_shapes():
    box = (12.5, 3.0, 40.0, 90.25)
    assert B.xyxy_to_xywh(box) == (12.5, 3.0, 27.5, 87.25)
    assert B.xywh_to_xyxy(B.xyxy_to_xywh(box)) == box
    arr = np.array([box, (0, 0, 1, 1)])
    out = B.xyxy_to_xywh(arr)
    assert isinstance(out, np.ndarray) and out.shape == (2, 4)
    np.testing.assert_allclose(B.xywh_to_xyxy(out), arr)
    assert arr[0, 2] == 40.0  # inputs are not modified


def test_grid_and_percent_conversions():
    w, h = 640, 480
    assert B.to_grid((0, 0, 640, 480), w, h) == (0, 0, 1000, 1000)
    assert B.to_grid((-10, 0, 700, 480), w, h) == (0, 0, 1000, 1000)  # clipped to the grid
    assert B.to_grid((0.32, 0, 640, 480), w, h) == (1, 0, 1000, 1000)  # 0.5 rounds up, never to even
    assert all(isinstance(v, int) for v in B.to_grid((1, 2, 3, 4), w, h))
    assert B.from_grid((500, 250, 1000, 1000), w, h) == (320.0, 120.0, 640.0, 480.0)
    assert B.to_percent((64, 48, 640, 480), w, h) == (10.0, 10.0, 90.0, 90.0)
    assert B.from_percent((10, 10, 90, 90), w, h) == (64.0, 48.0, 640.0, 480.0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 4000), st.data())
def test_round_trips(w, h, data):
    x1 = data.draw(st.floats(0, w - 0.5))
    y1 = data.draw(st.floats(0, h - 0.5))
    x2 = data.draw(st.floats(x1 + 0.5, w))
    y2 = data.draw(st.floats(y1 + 0.5, h))
    box = (x1, y1, x2, y2)
    np.testing.assert_allclose(B.from_percent(B.to_percent(box, w, h), w, h), box, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(B.xywh_to_xyxy(B.xyxy_to_xywh(box)), box, rtol=1e-12, atol=1e-9)
    # the grid quantises: back within half a grid step of each side
    back = B.from_grid(B.to_grid(box, w, h), w, h)
    tol = np.array([w, h, w, h]) / 1000 / 2 + 1e-9
    assert np.all(np.abs(np.array(back) - np.array(box)) <= tol)
    # grid integers survive the round trip exactly
    g = B.to_grid(box, w, h)
    assert B.to_grid(B.from_grid(g, w, h), w, h) == g


def test_format_box_dialects():
    box = (10.5, 20.49, 100.0, 200.5)
    assert B.format_box(box) == "[11, 20, 100, 201]"
    assert B.format_box(box, "pixels") == "[11, 20, 100, 201]"
    assert B.format_box(box, "pairs") == "(11,20),(100,201)"
    assert B.format_box(box, "qwen_json") == '{"bbox_2d": [11, 20, 100, 201]}'
    assert B.format_box((0, 0, 320, 240), "grid1000", width=640, height=480) == "[0, 0, 500, 500]"
    with pytest.raises(ValueError):
        B.format_box(box, "grid1000")
    with pytest.raises(ValueError):
        B.format_box(box, "xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        B.format_box(np.array([box, box]))


def test_round_box_half_away_from_zero():
    assert B.round_box((0.5, 1.5, 2.5, 3.49)) == (1, 2, 3, 3)
    np.testing.assert_array_equal(B.round_box(np.array([[0.5, 1.5, 2.5, 3.5]])), [[1, 2, 3, 4]])


def test_bad_shapes_rejected():
    with pytest.raises(ValueError):
        B.as_boxes((1, 2, 3))
    with pytest.raises(ValueError):
        B.to_grid((0, 0, 1, 1), 0, 10)
