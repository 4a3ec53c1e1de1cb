"""Answer parsing (stages/answers.py): the strict trace reading, the dialects of the LLM stages, the
eval's lenient reading, and verification against the ground truth."""

from __future__ import annotations

import dataclasses
import doctest

import numpy as np
import pytest

from refforge.stages import answers
from refforge.stages.answers import PARSE_STATUSES, Answer, parse_answer, verify
from refforge.stages.scene.boxes import DIALECTS

W, H = 320, 240
RED = (40.0, 40.0, 120.0, 120.0)


def test_doctests_run():
    result = doctest.testmod(answers)
    assert result.attempted > 0 and result.failed == 0


def test_an_answer_is_a_frozen_value():
    a = parse_answer("<answer>[1, 2, 3, 4]</answer>")
    assert a == Answer("box", (1.0, 2.0, 3.0, 4.0), raw="[1, 2, 3, 4]")
    assert hash(a) == hash(Answer("box", (1.0, 2.0, 3.0, 4.0), raw="[1, 2, 3, 4]"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.status = "rejection"  # type: ignore[misc]
    assert not hasattr(a, "__dict__")


# ------------------------------------------------------------------------------------------ strict


@pytest.mark.parametrize("text, status, box", [
    ("<think>x</think><answer>[10, 20, 110, 220]</answer>", "box", (10, 20, 110, 220)),
    ("<answer> [10.5,20,110,220.25] </answer>", "box", (10.5, 20, 110, 220.25)),
    ("The ball is at [1, 2, 3, 4].", "box", (1, 2, 3, 4)),
    ('<answer>{"bbox_2d": [5, 6, 7, 8]}</answer>', "box", (5, 6, 7, 8)),
    ("<answer>(5,6),(7,8)</answer>", "box", (5, 6, 7, 8)),
    ("<answer>none</answer>", "rejection", None),
    ("<answer>None.</answer>", "rejection", None),
    ("<answer>null</answer>", "rejection", None),
    ("<answer>No object</answer>", "rejection", None),
    ("<answer>no such object</answer>", "rejection", None),
    ("<answer>[]</answer>", "rejection", None),
    ("<answer>[0, 0, 0, 0]</answer>", "rejection", None),
    ("<answer>There is no red ball.</answer>", "rejection", None),
    ("<think>[1, 2, 3, 4] looks wrong</think><answer>none</answer>", "rejection", None),
    ("<answer></answer>", "unparseable", None),
    ("<answer>the ball</answer>", "unparseable", None),
    ("<answer>[1, 2, 3]</answer>", "unparseable", None),
    ("<answer>[1, 2, 3, 4] [5, 6, 7, 8]</answer>", "unparseable", None),
    ("<think>unfinished", "unparseable", None),
])
def test_strict_reading(text, status, box):
    p = parse_answer(text)
    assert p.status == status, p
    assert p.box == (None if box is None else tuple(float(v) for v in box))
    assert (p.reason is None) == (status != "unparseable")
    assert p.note is None


def test_strict_reading_keeps_the_text_it_read_and_why_it_failed():
    assert parse_answer("<answer>a</answer> <answer> [1, 2, 3, 4] </answer>").raw == "[1, 2, 3, 4]"
    assert parse_answer("  none  ").raw == "none"
    assert parse_answer("<answer> </answer>").reason == "empty answer"
    assert parse_answer("[1, 2, 3, 4] (5,6),(7,8) [9, 9, 9, 9]").reason == "2 boxes in the answer"
    assert parse_answer("the ball").reason == "no box and no rejection in the answer"
    # the strict reading takes an answer opening with "no"/"not" as a rejection; the lenient one does not
    assert parse_answer("Not sure.").status == "rejection"
    assert parse_answer("Not sure.", lenient=True).status == "unparseable"


def test_the_walks_own_answers_take_the_one_pattern_path_alike():
    for a in ("[10, 20, 30, 40]", "[-5, 2, 30, 40]", "[1.5, 2, 30.25, 40]", "[0, 0, 0, 0]", "[-0, 0, 0, 0]",
              "[0, 0, 0, 1]"):
        slow = answers._read(a)  # the reading without the one-pattern shortcut
        assert parse_answer(a) == parse_answer(f"<answer>{a}</answer>") == slow, a


# ------------------------------------------------------------------------------------------ dialects


def test_dialects_map_the_box_to_stored_pixels():
    assert parse_answer("<answer>[40, 40, 120, 120]</answer>", dialect="pixels", width=W, height=H).box == RED
    assert parse_answer("<answer>[125, 167, 375, 500]</answer>", dialect="grid1000", width=W, height=H).box == \
        pytest.approx((40.0, 40.08, 120.0, 120.0))
    assert parse_answer("<answer>(20,20),(60,60)</answer>", dialect="pairs", width=W, height=H,
                        sent_size=(160, 120)).box == RED
    assert parse_answer('<answer>{"bbox_2d": [40, 40, 120, 120]}</answer>', dialect="qwen_json", width=W,
                        height=H).box == RED
    # grid numbers in any notation
    assert parse_answer('{"bbox_2d": [125, 167, 375, 500]}', dialect="grid1000", width=W, height=H).box == \
        pytest.approx((40.0, 40.08, 120.0, 120.0))
    # pixels without sizes: the numbers as written (still checked for an area)
    assert parse_answer("[1, 2, 3, 4]", dialect="pixels").box == (1.0, 2.0, 3.0, 4.0)


def test_dialects_read_null_boxes_as_rejections_and_clip():
    for none in ("<answer>none</answer>", "<answer>null</answer>", '<answer>{"bbox_2d": null}</answer>',
                 '[{"bbox_2d": []}, {"bbox_2d": "none"}]'):
        a = parse_answer(none, dialect="qwen_json", width=W, height=H)
        assert a.status == "rejection" and a.box is None, none
    # the strict reading without a dialect does not know {"bbox_2d": null}
    assert parse_answer('{"bbox_2d": null}').status == "unparseable"
    assert parse_answer("[-10, -10, 400, 100]", dialect="pixels", width=W, height=H).box == (0.0, 0.0, 320.0, 100.0)
    a = parse_answer("<answer>[50, 50, 10, 10]</answer>", dialect="pixels", width=W, height=H)
    assert (a.status, a.reason, a.raw) == ("unparseable", "degenerate box [50.0, 50.0, 10.0, 10.0]", "[50, 50, 10, 10]")
    assert parse_answer("[400, 10, 500, 20]", dialect="pixels", width=W, height=H).status == "unparseable"  # outside
    assert parse_answer("somewhere on the left", dialect="pixels", width=W, height=H).status == "unparseable"


def test_option_errors():
    with pytest.raises(ValueError, match="unknown box dialect 'kosmos'"):
        parse_answer("[1, 2, 3, 4]", dialect="kosmos")
    with pytest.raises(ValueError, match="grid1000 dialect needs"):
        parse_answer("[1, 2, 3, 4]", dialect="grid1000")
    with pytest.raises(ValueError, match="give the dialect"):
        parse_answer("[1, 2, 3, 4]", width=W, height=H)
    with pytest.raises(ValueError, match="map_box"):
        parse_answer("[1, 2, 3, 4]", lenient=True, dialect="pixels")
    assert set(DIALECTS) == {"pixels", "grid1000", "pairs", "qwen_json"}


# ------------------------------------------------------------------------------------------ lenient


@pytest.mark.parametrize("text,status,box", [
    ("[40, 30, 120, 90]", "box", (40, 30, 120, 90)),
    ("<think>left ball [1, 2, 3, 4]?</think><answer>[40, 30, 120, 90]</answer>", "box", (40, 30, 120, 90)),
    ('```json\n[{"bbox_2d": [5, 6, 7, 8], "label": "cup"}]\n```', "box", (5, 6, 7, 8)),
    ('{"bbox_2d": [5.5, 6, 7, 8]}', "box", (5.5, 6, 7, 8)),
    ('[{"bbox_2d": [1, 1, 2, 2], "score": 0.1}, {"bbox_2d": [5, 6, 7, 8], "score": 0.7}]', "box", (5, 6, 7, 8)),
    ('[{"bbox_2d": [1, 1, 2, 2]}, {"bbox_2d": [5, 6, 7, 8]}]', "box", (1, 1, 2, 2)),
    ('[{"bbox_2d": [1, 1, 2, 2], "label": "a"}, {"bbox_2d": [5, 6, 7, ', "box", (1, 1, 2, 2)),  # cut-off JSON
    ("<|box_start|>(10,20),(30,40)<|box_end|>", "box", (10, 20, 30, 40)),
    ("It is at [3, 4, 9, 9]. Final: [3, 4, 9, 9]", "box", (3, 4, 9, 9)),
    ("[1.5e2, 2, 3, 4]", "box", (150, 2, 3, 4)),
    ("no such object", "rejection", None),
    ("<answer>[]</answer>", "rejection", None),
    ("[]", "rejection", None),
    ('{"bbox_2d": null}', "rejection", None),
    ("[0, 0, 0, 0]", "rejection", None),
    ("The described kite does not exist in this image.", "rejection", None),
    ("There is no green ball.", "rejection", None),
    ("I'm sorry, but I can't help with identifying that.", "refusal", None),
    ("[1, 2, 3, 4] or [5, 6, 7, 8]", "unparseable", None),
    ("<answer>[10, 10, 60</answer>", "unparseable", None),
    ("the cup", "unparseable", None),
    ("Not sure which one you mean.", "unparseable", None),
    ("I'm sorry, but there is no green ball in this image.", "rejection", None),
    ("(0,0),(0,0)", "rejection", None),
    ('{"bbox_2d": [1, 2, 3]}', "unparseable", None),
    ("", "empty", None),
    ("<think>all thought</think><answer> </answer>", "empty", None),
    (None, "empty", None),
])
def test_lenient_reading_of_every_dialect(text, status, box):
    a = parse_answer(text, lenient=True)
    assert a.status == status, a
    assert a.status in PARSE_STATUSES
    assert a.box == (None if box is None else tuple(float(v) for v in box))
    if status not in ("box", "rejection"):
        assert a.reason


def test_lenient_notes_and_reasons_are_the_eval_files_words():
    a = parse_answer('[{"bbox_2d": [1, 1, 2, 2]}, {"bbox_2d": [5, 6, 7, 8]}]', lenient=True)
    assert a.note == "2 boxes in the answer; took the first"
    b = parse_answer('[{"bbox_2d": [1, 1, 2, 2], "score": 0.1}, {"bbox_2d": [5, 6, 7, 8], "score": 0.7}]',
                     lenient=True)
    assert b.note == "2 boxes in the answer; took the highest-scored (#2)"
    c = parse_answer('[{"box": [1, 1, 2, 2]}, {"box": [5, 6, 7, 8]}, {"box": [0, 1, 2, 3]}]', lenient=True)
    assert (c.box, c.note) == ((1.0, 1.0, 2.0, 2.0), "3 boxes in the answer; took the first")
    assert parse_answer("[1, 2, 3, 4] [1, 2, 3, 4]", lenient=True).note is None  # the same box twice
    assert parse_answer("[1, 2, 3, 4] or [5, 6, 7, 8]", lenient=True).reason == \
        "ambiguous: 2 different boxes in the answer"
    assert parse_answer('{"bbox": "left"}', lenient=True).reason == 'bbox is not four numbers: "left"'
    assert parse_answer("I'm sorry, I can't.", lenient=True).reason == "the model declined in text"
    assert parse_answer("  ", lenient=True).reason == "the answer was empty"
    assert parse_answer("<answer></answer>", lenient=True).reason == "the <answer> element is empty"
    assert parse_answer("the cup", lenient=True).reason == "no box and no rejection in the answer"
    assert parse_answer("<think>x</think><answer> [1, 2, 3, 4] </answer>", lenient=True).raw == "[1, 2, 3, 4]"


# ------------------------------------------------------------------------------------------ verify


def test_verify_verdicts():
    gt = (0.0, 0.0, 10.0, 10.0)
    box = Answer("box", (0.0, 0.0, 10.0, 10.0))
    off = Answer("box", (5.0, 0.0, 15.0, 10.0))  # IoU 1/3
    none = Answer("rejection")
    bad = Answer("unparseable")
    assert verify(box, "positive", gt) == ("correct", 1.0)
    assert verify(off, "positive", gt)[0] == "wrong_box"
    assert verify(off, "positive", gt, iou_threshold=0.3)[0] == "correct"
    assert verify(none, "positive", gt) == ("false_rejection", 0.0)
    assert verify(box, "negative", None) == ("false_positive", None)
    assert verify(none, "negative", None) == ("correct_rejection", None)
    assert verify(bad, "positive", gt) == ("unparseable", None)
    for failure in ("empty", "refusal"):  # every failure of the lenient reading is unparseable here
        assert verify(Answer(failure), "negative") == ("unparseable", None)
    with pytest.raises(ValueError):
        verify(box, "positive", None)
    with pytest.raises(ValueError):
        verify(box, "maybe", gt)


def test_verify_reads_every_form_of_the_ground_truth_alike():
    box = Answer("box", (0.0, 0.0, 10.0, 10.0))
    want = verify(box, "positive", (0.0, 0.0, 10.0, 12.0))
    for gt in ((0, 0, 10, 12), [0, 0, 10, 12], [0.0, 0.0, 10.0, 12.0], np.array([0.0, 0.0, 10.0, 12.0])):
        assert verify(box, "positive", gt) == want
    with pytest.raises(ValueError):
        verify(box, "positive", (0.0, 0.0, 10.0))
