"""Refinement never empties a (type, level) stratum, keeps its floor, and says so (issue 12, deliverable 5)."""

from __future__ import annotations

import json
import math
import random

import pytest

from refforge.stages.negatives_text import NegativesTextConfig, _blind_summary
from refforge.stages.negatives_text.edits import NEGATIVE_TYPES
from refforge.stages.negatives_text.refine import floor_counts, refine

COLOURS = ["red", "blue", "green", "white", "black"]
CATS = ["ball", "cup", "box", "lamp", "vase", "book"]


def separable(seed: int = 0, images: int = 60, per_image: int = 4):
    """Negatives that a blind model tells apart perfectly: each has words no positive has. The release
    before this one rejected every negative here and reported a nan AUROC."""
    rng = random.Random(seed)
    pos, pg, neg, ng, nt, nl = [], [], [], [], [], []
    for img in range(images):
        for _ in range(per_image):
            c, o = rng.choice(COLOURS), rng.choice(CATS)
            pos.append(f"the {c} {o} on the left")
            pg.append(img)
            neg.append(f"the {c} zebra {o} under the moon")
            ng.append(img)
            nt.append(rng.choice(["replace_object", "swap_object"]))
            nl.append(rng.choice(["L1", "L2"]))
    return pos, pg, neg, ng, nt, nl


def strata_of(nt, nl):
    return [f"{t}/{lv}" for t, lv in zip(nt, nl, strict=True)]


def test_a_round_that_would_reject_everything_keeps_one_per_stratum():
    pos, pg, neg, ng, nt, nl = separable()
    res = refine(pos, pg, neg, ng, nt, target_auroc=0.6, neg_levels=nl)
    strata = strata_of(nt, nl)
    kept_strata = {strata[i] for i in res.kept}
    assert kept_strata == set(strata)  # no stratum is emptied
    assert all(res.strata_after[s] == 1 for s in set(strata))  # floor_min = 1, floor 0: exactly one each
    assert math.isfinite(res.auroc_after) and not res.met
    assert res.floored == sorted(set(strata))


def test_the_floor_brings_back_the_least_separable_negatives():
    """``_floor`` tops a stratum up with its lowest-scored rejected negatives (ties by index)."""
    import numpy as np

    from refforge.stages.negatives_text.refine import _floor

    kidx = np.array([0, 1, 2, 3, 4, 5])
    strata = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.9, 0.2, 0.5, 0.7, 0.7, 0.1])
    keep = np.array([False, False, False, False, False, True])
    got, short = _floor(keep, kidx, strata, np.array([2, 2]), scores)
    assert got.tolist() == [False, True, True, True, False, True] and short == {0, 1}
    same, none = _floor(got, kidx, strata, np.array([2, 2]), scores)
    assert same.tolist() == got.tolist() and none == set()


@pytest.mark.parametrize("floor, floor_min", [(0.2, 1), (0.5, 1), (0.0, 7)])
def test_the_floor_of_every_stratum_is_kept(floor, floor_min):
    pos, pg, neg, ng, nt, nl = separable(seed=1)
    res = refine(pos, pg, neg, ng, nt, target_auroc=0.6, neg_levels=nl, floor=floor, floor_min=floor_min)
    strata = strata_of(nt, nl)
    want = floor_counts(strata, floor, floor_min)
    assert res.floors == want
    for s, n in want.items():
        assert res.strata_after[s] >= n
        assert n == min(strata.count(s), max(math.ceil(floor * strata.count(s)), floor_min))
    assert len(res.kept) + len(res.rejected) == len(neg)


def test_without_levels_the_strata_are_the_types():
    pos, pg, neg, ng, nt, _nl = separable(seed=2)
    res = refine(pos, pg, neg, ng, nt, target_auroc=0.6)
    assert set(res.strata_after) == set(nt) and all(v >= 1 for v in res.strata_after.values())
    assert res.counts_after == res.strata_after


def test_a_floor_that_does_not_bind_changes_nothing():
    """Negatives a blind model cannot separate: no round runs, every floor is met by the selection."""
    rng = random.Random(3)
    pos, pg, neg, ng, nt, nl = [], [], [], [], [], []
    for img in range(40):
        for _ in range(3):
            pos.append(f"the {rng.choice(COLOURS)} {rng.choice(CATS)}")
            pg.append(img)
            neg.append(f"the {rng.choice(COLOURS)} {rng.choice(CATS)}")
            ng.append(img)
            nt.append("replace_attribute")
            nl.append("L1")
    a = refine(pos, pg, neg, ng, nt, neg_levels=nl, floor=0.0)
    b = refine(pos, pg, neg, ng, nt, neg_levels=nl, floor=0.9)
    assert a.kept == b.kept and a.auroc_after == b.auroc_after and not b.floored


@pytest.mark.parametrize("floor, floor_min", [(-0.1, 1), (1.5, 1), (0.2, 0)])
def test_floor_counts_rejects_bad_settings(floor, floor_min):
    with pytest.raises(ValueError):
        floor_counts(["a"], floor, floor_min)


def test_floor_counts_never_exceeds_what_was_generated():
    assert floor_counts(["a"] * 3 + ["b"], floor=0.9, floor_min=10) == {"a": 3, "b": 1}


def test_the_run_file_line_is_strict_json_and_warns_about_empty_types():
    pos, pg, neg, ng, nt, nl = separable(seed=4)
    section = NegativesTextConfig(refine_floor=0.0)
    res = refine(pos, pg, neg, ng, nt, target_auroc=0.6, neg_levels=nl, floor=0.0)
    strata = strata_of(nt, nl)
    summary = _blind_summary(res, strata, set(res.kept), section)
    json.dumps(summary, allow_nan=False)  # no NaN, no inf
    text = "\n".join(summary["warnings"])
    # the three types this build never generated are named, as is the floor that bound and the AUROC
    for t in NEGATIVE_TYPES:
        assert (f"no {t} text negatives" in text) == (t not in set(nt))
    assert "held" in text and "floor" in text and "above the target" in text
    assert summary["strata"]["swap_object/L1"]["kept"] >= 1


def test_an_undefined_auroc_is_none_in_the_summary():
    """A single image: nothing can be held out, the AUROCs are undefined (nan in the result, None in the
    run file), and every candidate is kept."""
    res = refine(["the red ball"], [0], ["the blue ball"], [0], ["replace_attribute"], neg_levels=["L1"])
    assert math.isnan(res.auroc_after)
    summary = _blind_summary(res, ["replace_attribute/L1"], set(res.kept), NegativesTextConfig())
    assert summary["auroc_before"] is None and summary["auroc_after"] is None
    json.dumps(summary, allow_nan=False)
    assert not any("above the target" in w for w in summary["warnings"])
