"""Leak-free splits: grouping, stratification, determinism, sizes, reviews and the leakage check."""

from __future__ import annotations

import datetime as dt
import doctest
import io
import itertools
import json
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from refforge.stages import splits as S
from refforge.stages.ingest.synthetic import generate_scene, render

KEY = ("task", "difficulty", "polarity", "negative_type")


def test_doctests_run():
    assert doctest.testmod(S).failed == 0


# ---------------------------------------------------------------------------------------------------
# A synthetic set: images with positives, text negatives on the same image, flip negatives on derived
# images (some derived twice: a flip of an inpainted image)
# ---------------------------------------------------------------------------------------------------

def make_set(seed: int = 0, n_images: int = 400):
    rng = np.random.default_rng(seed)
    samples, parents = [], {}
    tasks = ["attribute", "spatial", "counting", "ordinal"]
    for i in range(n_images):
        img = f"img{i}"
        for j in range(int(rng.integers(1, 12))):
            sid = f"s{i}_{j}"
            t = tasks[int(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))]
            d = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
            samples.append(dict(sample_id=sid, image_id=img, task=t, difficulty=d, polarity="positive",
                                negative_type=None, positive_id=None))
            if rng.random() < 0.4:
                nt = ["replace_object", "swap_attribute", "replace_relation"][int(rng.integers(3))]
                samples.append(dict(sample_id=sid + "n", image_id=img, task=t, difficulty=d,
                                    polarity="negative", negative_type=nt, positive_id=sid))
            if rng.random() < 0.1:
                f = f"flip{i}_{j}"
                parents[f] = img
                if rng.random() < 0.3:  # a flip of an inpainted image: a chain of two derivations
                    inp = f"inp{i}_{j}"
                    parents[inp] = img
                    parents[f] = inp
                samples.append(dict(sample_id=sid + "f", image_id=f, task=t, difficulty=d,
                                    polarity="negative", negative_type="flip", positive_id=None))
    images = [{"image_id": f"img{i}", "parent_image_id": None} for i in range(n_images)]
    images += [{"image_id": k, "parent_image_id": v} for k, v in sorted(parents.items())]
    return samples, images


def root_of(image_id, parents):
    while image_id in parents:
        image_id = parents[image_id]
    return image_id


def tv_distance(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


@pytest.fixture(scope="module")
def dataset():
    return make_set()


# ---------------------------------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------------------------------

def test_groups_never_straddle_splits(dataset):
    samples, images = dataset
    parents = {r["image_id"]: r["parent_image_id"] for r in images if r["parent_image_id"]}
    for seed in range(3):
        out = S.assign_splits(samples, images=images, seed=seed)
        assert set(out) == {s["sample_id"] for s in samples}
        by_root = defaultdict(set)
        for s in samples:
            by_root[root_of(s["image_id"], parents)].add(out[s["sample_id"]])
        assert all(len(v) == 1 for v in by_root.values())
        # a negative follows its positive
        for s in samples:
            if s["positive_id"]:
                assert out[s["sample_id"]] == out[s["positive_id"]]
        # derived images (flips, flips of inpaints) follow their parents
        by_image = defaultdict(set)
        for s in samples:
            by_image[s["image_id"]].add(out[s["sample_id"]])
        flips = [s for s in samples if s["negative_type"] == "flip"]
        assert flips and any(parents[parents[s["image_id"]]] for s in flips if parents[s["image_id"]] in parents)
        for s in flips:
            img = s["image_id"]
            while img in parents:
                img = parents[img]
                if img in by_image:
                    assert by_image[img] == {out[s["sample_id"]]}


def test_sample_groups_links():
    samples = [
        {"sample_id": "a", "image_id": "I"},
        {"sample_id": "b", "image_id": "F2", "parent_image_id": "F1"},  # parent given on the sample
        {"sample_id": "c", "image_id": "J"},
        {"sample_id": "d", "image_id": "K", "positive_id": "c"},  # a negative on another image
        {"sample_id": "e", "image_id": "L", "scene": 7},
        {"sample_id": "f", "image_id": "M", "scene": 7},
        {"sample_id": "g", "image_id": "N", "scene": None},
    ]
    g = S.sample_groups(samples, images={"F1": "I"}, group_of=lambda s: s.get("scene"))
    assert g == {"a": "a", "b": "a", "c": "c", "d": "c", "e": "e", "f": "e", "g": "g"}
    # input order does not change the group ids
    assert S.sample_groups(samples[::-1], images={"F1": "I"}, group_of=lambda s: s.get("scene")) == g
    with pytest.raises(ValueError, match="duplicate"):
        S.sample_groups([{"sample_id": "a", "image_id": "I"}] * 2)
    # a parent cycle does not hang
    assert len(set(S.sample_groups(samples[:2], images={"F1": "F2", "F2": "F1"}).values())) == 2


def test_group_of_keeps_near_duplicate_clusters_together(dataset):
    samples, images = dataset
    twin = {f"img{i}": "cluster" for i in range(0, 40, 4)}  # ten images declared near-duplicates
    out = S.assign_splits(samples, images=images, seed=0, group_of=lambda s: twin.get(s["image_id"]))
    assert len({out[s["sample_id"]] for s in samples if s["image_id"] in twin}) == 1


# ---------------------------------------------------------------------------------------------------
# Stratification, sizes, determinism
# ---------------------------------------------------------------------------------------------------

def test_stratification_approximately_preserved(dataset):
    samples, images = dataset
    n = len(samples)
    overall = Counter(tuple(s[f] for f in KEY) for s in samples)
    for seed in range(3):
        out = S.assign_splits(samples, images=images, seed=seed)
        per = defaultdict(Counter)
        for s in samples:
            per[out[s["sample_id"]]][tuple(s[f] for f in KEY)] += 1
        sizes = {k: sum(c.values()) for k, c in per.items()}
        assert abs(sizes["train"] - 0.8 * n) <= 20 and abs(sizes["test"] - 0.1 * n) <= 20
        for split, c in per.items():
            # the joint key over ~60 strata: a random group split of 10% lands around 0.11-0.13
            assert tv_distance(c, overall) < 0.09, (split, tv_distance(c, overall))
            for i, f in enumerate(KEY):  # each field's marginal is close
                marg = Counter({k: v for k, v in Counter(key[i] for key in c.elements()).items()})
                over = Counter(key[i] for key in overall.elements())
                assert tv_distance(marg, over) < 0.03, (split, f)


def test_deterministic_by_seed_and_independent_of_input_order(dataset):
    samples, images = dataset
    a = S.assign_splits(samples, images=images, seed=5)
    assert S.assign_splits(samples, images=images, seed=5) == a
    shuffled = list(samples)
    random.Random(1).shuffle(shuffled)
    assert S.assign_splits(shuffled, images=images[::-1], seed=5) == a
    others = [S.assign_splits(samples, images=images, seed=s) for s in (6, 7)]
    assert all(o != a for o in others)


@pytest.mark.parametrize("test_size", [0, 1, 37, 200, 500, 1000])
def test_test_size_honoured_at_group_granularity(dataset, test_size):
    samples, images = dataset
    groups = S.sample_groups(samples, images={r["image_id"]: r["parent_image_id"] for r in images})
    largest = max(Counter(groups.values()).values())
    out = S.assign_splits(samples, images=images, test_size=test_size, seed=3)
    c = Counter(out.values())
    assert abs(c["test"] - test_size) <= largest
    # the rest is shared by train and val in the default proportion 8:1
    rest = len(samples) - c["test"]
    assert abs(c["val"] - rest / 9) <= largest
    if test_size == 0:
        assert c["test"] == 0


def test_test_size_larger_than_the_set_and_custom_ratios():
    samples, images = make_set(1, n_images=30)
    out = S.assign_splits(samples, images=images, test_size=10**6, seed=0)
    assert set(out.values()) == {"test"}
    out = S.assign_splits(samples, images=images, ratios={"train": 3, "test": 1}, seed=0)
    c = Counter(out.values())
    assert set(c) == {"train", "test"} and abs(c["test"] - len(samples) / 4) <= 15
    for seed in range(5):  # a split with ratio 0 gets nothing, even when the others are full
        out = S.assign_splits(samples, images=images, ratios={"train": 0.7, "val": 0, "test": 0.3}, seed=seed)
        assert "val" not in set(out.values())
    out = S.assign_splits(samples, images=images, ratios={"test": 1.0}, test_size=5, seed=0)
    assert set(out.values()) <= {"train", "test"}  # with only "test" in ratios the rest goes to train


def test_bad_arguments_and_empty_input():
    assert S.assign_splits([], seed=0) == {}
    s = [{"sample_id": "a", "image_id": "I", "task": "t", "difficulty": 1, "polarity": "positive"}]
    for bad in ({"train": -1}, {}, {"train": 0, "test": 0}, {"train": float("nan")}):
        with pytest.raises(ValueError):
            S.assign_splits(s, ratios=bad)
    with pytest.raises(ValueError):
        S.assign_splits(s, test_size=-1)
    with pytest.raises(ValueError):
        S.assign_splits(s, test_size=2.5)


def test_assigned_splits_pass_the_leakage_check(dataset):
    samples, images = dataset
    out = S.assign_splits(samples, images=images, seed=0)
    assert S.check_leakage(out, images, samples=samples, phash_threshold=None) == []


# ---------------------------------------------------------------------------------------------------
# Stratification on a demo-like population: a rare stratum that lives only in small groups
# ---------------------------------------------------------------------------------------------------

def demo_like(seed: int = 0, n_images: int = 430):
    """Image groups of 15-100 samples (difficulty 2/3), and one image in four with only 4-8 samples
    that hold every difficulty-1 sample and half of them "attribute": the layout of the demo build,
    on which placing the largest groups first put L1 at 10% of val and test (3.6% overall)."""
    rng = np.random.default_rng(seed)
    samples, images = [], []
    for i in range(n_images):
        img = f"img{i:04d}"
        images.append({"image_id": img, "parent_image_id": None})
        small = rng.random() < 1 / 4
        size = int(rng.integers(4, 9)) if small else int(rng.integers(15, 101))
        flip = None
        if rng.random() < 0.2:
            flip = f"flip{i:04d}"
            images.append({"image_id": flip, "parent_image_id": img})
        pos = None
        for j in range(size):
            sid = f"s{i:04d}_{j:03d}"
            if small:
                d = 1 if rng.random() < 0.9 else 2
                task = "attribute" if rng.random() < 0.5 else "relation"
            else:
                d = 3 if rng.random() < 0.03 else 2
                task = ["relation", "position", "attribute"][int(rng.choice(3, p=[0.6, 0.3, 0.1]))]
            if pos is not None and rng.random() < 0.6:
                nt = ["replace_object", "replace_attribute", "swap_object"][int(rng.choice(3, p=[0.6, 0.3, 0.1]))]
                image = img
                if flip is not None and rng.random() < 0.3:
                    nt, image = "flip", flip
                samples.append(dict(sample_id=sid, image_id=image, task="reject", difficulty=d,
                                    polarity="negative", negative_type=nt, positive_id=pos))
            else:
                samples.append(dict(sample_id=sid, image_id=img, task=task, difficulty=d,
                                    polarity="positive", negative_type=None, positive_id=None))
                pos = sid
    return samples, images


@pytest.fixture(scope="module")
def demo_set():
    return demo_like()


def share_report(samples, out):
    """``(field, value) -> (overall share, {split: share in that split}, overall count)``."""
    size = Counter(out.values())
    n = len(samples)
    rep = {}
    for f in KEY:
        overall = Counter(s[f] for s in samples)
        per = defaultdict(Counter)
        for s in samples:
            per[out[s["sample_id"]]][s[f]] += 1
        for v, c in overall.items():
            rep[(f, v)] = (c / n, {sp: per[sp][v] / size[sp] for sp in size}, c)
    return rep


def test_demo_like_population_has_the_rare_stratum_in_small_groups(demo_set):
    samples, images = demo_set
    groups = S.sample_groups(samples, images={r["image_id"]: r["parent_image_id"] for r in images})
    size = Counter(groups.values())
    l1_groups = {groups[s["sample_id"]] for s in samples if s["difficulty"] == 1}
    assert max(size[g] for g in l1_groups) <= 8  # L1 only in small groups
    assert 0.02 < sum(s["difficulty"] == 1 for s in samples) / len(samples) < 0.05
    assert len(size) == 430 and sum(v > 50 for v in size.values()) > 100


# every marginal value with at least 100 samples: its share in each split is within this of its overall share
def tolerance(p: float) -> float:
    return max(0.01, 0.15 * p)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rare_stratum_in_small_groups_is_spread_evenly(demo_set, seed):
    samples, images = demo_set
    out = S.assign_splits(samples, images=images, seed=seed)
    for (f, v), (p, per, count) in share_report(samples, out).items():
        if count < 100:
            continue
        for sp, q in per.items():
            assert abs(q - p) <= tolerance(p), (f, v, sp, round(p, 4), round(q, 4))
    # the case of the bug report, stated directly: L1 and "attribute" about as common in val and
    # test as in train
    rep = share_report(samples, out)
    for key in (("difficulty", 1), ("task", "attribute")):
        p, per, _ = rep[key]
        assert max(per.values()) - min(per.values()) <= 0.2 * p, (key, per)


@pytest.mark.parametrize("seed", [0, 1])
def test_demo_like_sizes_and_groups(demo_set, seed):
    samples, images = demo_set
    n = len(samples)
    out = S.assign_splits(samples, images=images, seed=seed)
    c = Counter(out.values())
    for sp, r in S.DEFAULT_RATIOS.items():
        assert abs(c[sp] - r * n) <= 0.01 * r * n + 10, (sp, c[sp], r * n)
    parents = {r["image_id"]: r["parent_image_id"] for r in images if r["parent_image_id"]}
    by_root = defaultdict(set)
    for s in samples:
        by_root[root_of(s["image_id"], parents)].add(out[s["sample_id"]])
        if s["positive_id"]:
            assert out[s["sample_id"]] == out[s["positive_id"]]
    assert len(by_root) == 430 and all(len(v) == 1 for v in by_root.values())


def test_demo_like_deterministic_and_seeded(demo_set):
    samples, images = demo_set
    a = S.assign_splits(samples, images=images, seed=3)
    shuffled = list(samples)
    random.Random(0).shuffle(shuffled)
    assert S.assign_splits(shuffled, images=images[::-1], seed=3) == a
    b = S.assign_splits(samples, images=images, seed=4)
    moved = sum(a[k] != b[k] for k in a)
    assert moved > 0.05 * len(a)  # another seed is another split, not the same one with a few swaps


def test_demo_like_test_size_stays_stratified(demo_set):
    samples, images = demo_set
    n = len(samples)
    out = S.assign_splits(samples, images=images, test_size=1000, seed=0)
    c = Counter(out.values())
    assert abs(c["test"] - 1000) <= 20
    assert abs(c["val"] - (n - 1000) / 9) <= 20
    for (f, v), (p, per, count) in share_report(samples, out).items():
        if count >= 100:
            assert all(abs(q - p) <= tolerance(p) for q in per.values()), (f, v, per)


def test_small_exact_case_small_rare_groups_spread():
    # twenty groups of 4 "common" samples and ten single "rare" samples; targets 72 / 9 / 9. The only
    # assignment that meets every target exactly: val and test two large groups and one rare sample each
    # (placing the largest groups first put 5 of the 10 rare samples in test)
    samples = []
    for i in range(20):
        samples += [{"sample_id": f"c{i}_{j}", "image_id": f"C{i}", "task": "common", "difficulty": 2,
                     "polarity": "positive"} for j in range(4)]
    for i in range(10):
        samples.append({"sample_id": f"r{i}", "image_id": f"R{i}", "task": "rare", "difficulty": 1,
                        "polarity": "positive"})
    for seed in range(5):
        out = S.assign_splits(samples, seed=seed)
        per = defaultdict(Counter)
        for s in samples:
            per[out[s["sample_id"]]][s["task"]] += 1
        assert per["train"] == Counter(common=64, rare=8), (seed, per)
        assert per["val"] == per["test"] == Counter(common=8, rare=1), (seed, per)


# ---------------------------------------------------------------------------------------------------
# Reviews
# ---------------------------------------------------------------------------------------------------

T0 = dt.datetime(2025, 1, 1, 12, 0)


def review(sid, decision, minutes=0, annotator="ann", fixed_box=None, fixed_text=None):
    return {"sample_id": sid, "annotator": annotator, "decision": decision, "fixed_box": fixed_box,
            "fixed_text": fixed_text, "task_id": None, "time": T0 + dt.timedelta(minutes=minutes)}


def test_restrict_test_to_accepted():
    splits = {"t_acc": "test", "t_fix": "test", "t_rej": "test", "t_none": "test",
              "tr_none": "train", "tr_rej": "train", "v_acc": "val"}
    reviews = [review("t_acc", "accept"), review("t_fix", "fix", fixed_text="x"), review("t_rej", "reject"),
               review("tr_rej", "reject"), review("v_acc", "accept")]
    assert S.restrict_test_to_accepted(splits, []) == splits  # no review at all: unchanged
    out = S.restrict_test_to_accepted(splits, reviews)
    assert out == {"t_acc": "test", "t_fix": "test", "tr_none": "train", "v_acc": "val"}
    out = S.restrict_test_to_accepted(splits, reviews, unreviewed="keep")
    assert out == {"t_acc": "test", "t_fix": "test", "t_none": "test", "tr_none": "train", "v_acc": "val"}
    with pytest.raises(ValueError):
        S.restrict_test_to_accepted(splits, reviews, unreviewed="maybe")


def test_latest_review_wins_and_ties_are_cautious():
    splits = {"a": "test", "b": "test", "c": "test"}
    reviews = [review("a", "accept", 0), review("a", "reject", 5, "other"),  # later reject wins
               review("b", "reject", 0), review("b", "accept", 5, "other"),  # later accept wins
               review("c", "accept", 3), review("c", "reject", 3, "other")]  # same time: reject wins
    assert S.restrict_test_to_accepted(splits, reviews) == {"b": "test"}
    with pytest.raises(ValueError, match="decision"):
        S.latest_reviews([review("a", "maybe")])


def test_apply_review_fixes():
    samples = [
        {"sample_id": "p", "polarity": "positive", "text": "the red cup", "gt_box": (0.0, 0.0, 5.0, 5.0)},
        {"sample_id": "q", "polarity": "positive", "text": "the blue cup", "gt_box": (1.0, 1.0, 5.0, 5.0)},
        {"sample_id": "n", "polarity": "negative", "text": "the green cup", "gt_box": None},
        {"sample_id": "r", "polarity": "positive", "text": "a ball", "gt_box": (2.0, 2.0, 4.0, 4.0)},
    ]
    reviews = [review("p", "fix", fixed_box=(1, 1, 6, 6)),
               review("q", "fix", fixed_text="the navy cup"),
               review("n", "fix", fixed_text="the lime cup"),
               review("r", "fix", 0, fixed_box=(0, 0, 9, 9)), review("r", "accept", 1)]  # fix superseded
    out = S.apply_review_fixes(samples, reviews)
    assert out[0]["gt_box"] == (1.0, 1.0, 6.0, 6.0) and out[0]["text"] == "the red cup"
    assert out[1]["gt_box"] == (1.0, 1.0, 5.0, 5.0) and out[1]["text"] == "the navy cup"
    assert out[2]["text"] == "the lime cup" and out[2]["gt_box"] is None
    assert out[3] == samples[3]
    assert samples[0]["gt_box"] == (0.0, 0.0, 5.0, 5.0)  # inputs not mutated
    assert "reviewed_referent" not in out[2]  # a text fix leaves a negative a negative


def _negatives_with_referents():
    pos = {"sample_id": "p", "image_id": "I", "polarity": "positive", "text": "the blue cup on the table",
           "gt_box": (0.0, 0.0, 5.0, 5.0), "target_object_id": "o1", "task": "relation",
           "tasks": {"refbench_pro": "relation", "groundingme": "spatial/relationship"}, "difficulty": 2,
           "path": '{"attributes": ["blue"], "category": "cup", "relations": [["on", {"category": "table"}]]}'}
    text_neg = {"sample_id": "n", "image_id": "I", "polarity": "negative", "text": "the red cup",
                "gt_box": None, "target_object_id": None, "task": "reject",
                "tasks": {"refbench_pro": "reject", "groundingme": "rejection/appearance"}, "difficulty": 1,
                "negative_type": "attribute", "negative_level": "L1", "negative_source": "text", "positive_id": "p",
                "needs_review": True,
                "path": '{"attributes": ["red"], "category": "cup", "edit": "blue->red", "relations": []}'}
    # no parseable query: the labels come from its positive
    odd_neg = {**text_neg, "sample_id": "m", "path": None, "text": "a cup nobody described"}
    # neither a query nor a positive: the rejection labels are made positive
    lone_neg = {**text_neg, "sample_id": "k", "path": "not json", "positive_id": None}
    return [pos, text_neg, odd_neg, lone_neg]


def test_a_negative_found_to_have_a_referent_becomes_a_positive():
    samples = _negatives_with_referents()
    box = (1, 2, 30, 40)
    reviews = [review("n", "fix", 5, "ann_b", fixed_box=box, fixed_text="the red mug"),
               review("n", "reject", 0, "ann_a"),  # an earlier decision: the later fix wins
               review("m", "fix", fixed_box=box), review("k", "fix", fixed_box=box)]
    before = [dict(s) for s in samples]
    out = {d["sample_id"]: d for d in S.apply_review_fixes(samples, reviews)}
    assert samples == before  # inputs not mutated
    n = out["n"]
    assert n["polarity"] == "positive" and n["gt_box"] == (1.0, 2.0, 30.0, 40.0) and n["text"] == "the red mug"
    assert (n["negative_type"], n["negative_level"], n["negative_source"], n["positive_id"]) == (None,) * 4
    assert n["needs_review"] is False and n["target_object_id"] is None and n["reviewed_referent"] is True
    # task labels by the taxonomy's rules, as a positive, on its own query ("the red cup": an attribute)
    assert n["task"] == "attribute"
    assert n["tasks"] == {"refbench_pro": "attribute", "groundingme": "discriminative/appearance"}
    note = json.loads(n["path"])
    assert note["category"] == "cup" and note["attributes"] == ["red"]  # the query is kept
    assert note["reviewed_referent"]["was_negative"] == {"negative_type": "attribute", "negative_level": "L1",
                                                         "negative_source": "text", "positive_id": "p",
                                                         "task": "reject"}
    assert note["reviewed_referent"]["annotator"] == "ann_b"
    # the fallbacks: the positive's labels, then the rejection labels made positive
    assert out["m"]["task"] == "relation" and out["m"]["tasks"]["groundingme"] == "spatial/relationship"
    assert out["k"]["task"] == "category"
    assert out["k"]["tasks"] == {"refbench_pro": "category", "groundingme": "discriminative/appearance"}
    assert json.loads(out["k"]["path"])["reviewed_referent"]["was_negative"]["negative_type"] == "attribute"
    assert out["p"] == samples[0]
    # the record passes the expressions table's rules for a positive (except target_object_id: not a graph object)
    from refforge.schemas import Expression

    rec = {k: v for k, v in n.items() if k in Expression.model_fields}
    Expression.model_validate({**rec, "target_object_id": "reviewed"})


def test_a_turned_negative_counts_as_reviewed_in_test_and_keeps_its_group():
    samples = _negatives_with_referents()[:2]
    reviews = [review("n", "fix", fixed_box=(1, 2, 3, 4))]
    fixed = S.apply_review_fixes(samples, reviews)
    # restrict_test_to_accepted: the fix counts as reviewed; the unreviewed positive leaves test
    assert S.restrict_test_to_accepted({"p": "test", "n": "test"}, reviews) == {"n": "test"}
    # the turned sample has no positive_id any more, but it shares the image: one group still
    assert S.sample_groups(fixed) == {"p": "n", "n": "n"}
    # a later reject by another annotator takes it out again
    later = [*reviews, review("n", "reject", 9, "other")]
    assert S.restrict_test_to_accepted({"n": "test"}, later) == {}
    assert S.apply_review_fixes(samples, later)[1]["polarity"] == "negative"


def test_canonical_record_of_a_turned_negative():
    from refforge.stages.export_formats import CANONICAL_SCHEMA, canonical_record

    samples = _negatives_with_referents()
    fixed = S.apply_review_fixes(samples, [review("n", "fix", fixed_box=(1, 2, 3, 4))])
    image = {"image_id": "I", "path": "images/ab/I.png", "width": 64, "height": 48, "source_ids": ["7"]}
    rec = canonical_record(fixed[1], image, split="test")
    assert rec["polarity"] == "positive" and rec["bbox"] == [1.0, 2.0, 3.0, 4.0] and rec["task"] == "attribute"
    assert rec["negative_type"] is None and json.loads(rec["path"])["reviewed_referent"]["was_negative"]
    import pyarrow as pa

    assert pa.Table.from_pylist([rec], schema=CANONICAL_SCHEMA).num_rows == 1


# ---------------------------------------------------------------------------------------------------
# Perceptual hash
# ---------------------------------------------------------------------------------------------------

def scene_image(seed: int) -> Image.Image:
    sc = generate_scene(seed)
    return render(sc.graph, sc.spec)


def jpeg(img: Image.Image, quality: int = 70) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_dct_matrix_against_the_textbook_formula():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, 32))
    fast = S._DCT @ x @ S._DCT.T
    n = np.arange(32)
    for k, m in [(0, 0), (1, 0), (0, 3), (5, 7), (7, 7)]:
        slow = sum(x[a, b] * np.cos(np.pi * k * (2 * a + 1) / 64) * np.cos(np.pi * m * (2 * b + 1) / 64)
                   for a in n for b in n)
        assert fast[k, m] == pytest.approx(slow)


def test_phash_hand_case_and_input_forms(tmp_path):
    # a flat image: only the DC coefficient is non-zero, so only the most significant bit is set
    assert S.phash(Image.new("RGB", (50, 40), (120, 30, 200))) == 1 << 63
    img = scene_image(0)
    h = S.phash(img)
    assert 0 <= h < 2**64
    png = io.BytesIO()
    img.save(png, format="PNG")
    path = tmp_path / "a.png"
    path.write_bytes(png.getvalue())
    assert S.phash(png.getvalue()) == h == S.phash(path) == S.phash(str(path)) == S.phash(np.asarray(img))
    assert S.hamming(h, f"{h:016x}") == 0 and S.hamming(0, -1) == 64


def test_phash_near_duplicates_close_and_different_images_far():
    imgs = [scene_image(s) for s in range(12)]
    hashes = [S.phash(im) for im in imgs]
    for im, h in zip(imgs[:6], hashes[:6], strict=True):
        assert S.hamming(h, S.phash(jpeg(im, 60))) <= 4
        assert S.hamming(h, S.phash(ImageEnhance.Brightness(im).enhance(1.05))) <= 6
        assert S.hamming(h, S.phash(im.resize((256, 192)))) <= 4
    far = [S.hamming(a, b) for a, b in itertools.combinations(hashes, 2)]
    assert min(far) > 6


def brute_pairs(hashes, threshold):
    ids = sorted(hashes)
    return sorted((a, b, S.hamming(hashes[a], hashes[b])) for a, b in itertools.combinations(ids, 2)
                  if S.hamming(hashes[a], hashes[b]) <= threshold)


@pytest.mark.parametrize("threshold", [0, 1, 3, 6, 10, 40, 70])
def test_near_duplicate_pairs_match_brute_force(threshold):
    rng = np.random.default_rng(threshold)
    base = [int(v) for v in rng.integers(0, 2**63, 60, dtype=np.int64)] + [2**64 - 1, 0]
    hashes = {}
    for i, h in enumerate(base):
        hashes[f"b{i:03d}"] = h
        for j in range(int(rng.integers(0, 3))):  # planted neighbours at 0..8 bits
            flip = rng.choice(64, int(rng.integers(0, 9)), replace=False)
            hashes[f"b{i:03d}_{j}"] = h ^ sum(1 << int(b) for b in flip)
    assert S.near_duplicate_pairs(hashes, threshold) == brute_pairs(hashes, threshold)
    assert S.near_duplicate_pairs({"x": 1}, threshold) == []
    assert S.near_duplicate_pairs(hashes, -1) == []


def test_phash_clusters():
    c = S.phash_clusters({"a": 0, "b": 0b11, "c": 0b1111, "d": 2**64 - 1}, threshold=2)
    assert c == {"a": "a", "b": "a", "c": "a", "d": "d"}  # a-b and b-c link: one cluster


# ---------------------------------------------------------------------------------------------------
# Leakage
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pixel_world():
    """Eight synthetic scenes, a flip of scene 0, and planted copies of scenes 1 and 2."""
    store: dict[str, bytes] = {}
    images, samples = [], []

    def add(image_id, img_bytes, parent=None, n_samples=2):
        store[image_id] = img_bytes
        images.append({"image_id": image_id, "parent_image_id": parent, "path": f"images/{image_id}.png"})
        for k in range(n_samples):
            samples.append({"sample_id": f"{image_id}-{k}", "image_id": image_id})

    def png(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    scenes = [scene_image(s) for s in range(8)]
    for i, im in enumerate(scenes):
        add(f"scene{i}", png(im))
    add("scene0-flip", png(ImageOps.mirror(scenes[0])), parent="scene0")
    add("scene1-jpeg", jpeg(scenes[1], 70))
    add("scene2-bright", png(ImageEnhance.Brightness(scenes[2]).enhance(1.05)))
    return images, samples, store


def clean_splits(samples):
    # scene i -> train for even i, test for odd i; every copy/derivative with its original
    split_of = {"scene0-flip": "train", "scene1-jpeg": "test", "scene2-bright": "train"}
    out = {}
    for s in samples:
        img = s["image_id"]
        out[s["sample_id"]] = split_of.get(img) or ("train" if int(img[5:]) % 2 == 0 else "test")
    return out


def test_clean_splits_have_no_leaks(pixel_world):
    images, samples, store = pixel_world
    splits = clean_splits(samples)
    assert S.check_leakage(splits, images, samples=samples, open_image=lambda r: store[r["image_id"]]) == []
    S.assert_no_leakage(splits, images, samples=samples, open_image=lambda r: store[r["image_id"]])


def test_leak_same_image_in_two_splits(pixel_world):
    images, samples, store = pixel_world
    splits = clean_splits(samples)
    splits["scene4-1"] = "test"  # scene4-0 is in train
    leaks = S.check_leakage(splits, images, samples=samples, open_image=lambda r: store[r["image_id"]])
    assert [(lk.kind, lk.image_ids, lk.splits) for lk in leaks] == [("image", ("scene4",), ("test", "train"))]
    assert leaks[0].sample_ids == ("scene4-0", "scene4-1")


def test_leak_parent_in_train_and_flip_in_test(pixel_world):
    images, samples, store = pixel_world
    splits = clean_splits(samples)
    for k in range(2):
        splits[f"scene0-flip-{k}"] = "test"
    leaks = S.check_leakage(splits, images, samples=samples, open_image=lambda r: store[r["image_id"]])
    assert [(lk.kind, lk.image_ids, lk.splits) for lk in leaks] == [
        ("parent", ("scene0", "scene0-flip"), ("test", "train"))]
    with pytest.raises(S.LeakageError) as err:
        S.assert_no_leakage(splits, images, samples=samples, open_image=lambda r: store[r["image_id"]])
    assert "scene0-flip" in str(err.value) and "scene0" in err.value.image_ids
    assert "scene0-flip-0" in err.value.sample_ids


def test_leak_near_duplicates_across_splits(pixel_world):
    images, samples, store = pixel_world
    splits = clean_splits(samples)
    for k in range(2):
        splits[f"scene1-jpeg-{k}"] = "train"  # scene1 is in test: a re-encoded copy in train
        splits[f"scene2-bright-{k}"] = "test"  # scene2 is in train: a brightened copy in test
    leaks = S.check_leakage(splits, images, samples=samples, open_image=lambda r: store[r["image_id"]])
    got = sorted((lk.kind, lk.image_ids) for lk in leaks)
    assert got == [("near_duplicate", ("scene1", "scene1-jpeg")), ("near_duplicate", ("scene2", "scene2-bright"))]
    assert all("hamming" in lk.detail for lk in leaks)
    with pytest.raises(S.LeakageError, match="scene1-jpeg") as err:
        S.assert_no_leakage(splits, images, samples=samples, open_image=lambda r: store[r["image_id"]])
    assert set(err.value.image_ids) == {"scene1", "scene1-jpeg", "scene2", "scene2-bright"}
    # the same check from precomputed hashes (ints or hex strings), or switched off
    hashes = {r["image_id"]: S.phash(store[r["image_id"]]) for r in images}
    assert S.check_leakage(splits, images, samples=samples, hashes=hashes) == leaks
    hex_images = [dict(r, phash=f"{hashes[r['image_id']]:016x}") for r in images]
    assert S.check_leakage(splits, hex_images, samples=samples) == leaks
    assert S.check_leakage(splits, images, samples=samples, phash_threshold=None) == []


def test_leakage_check_needs_pixels_and_known_samples(pixel_world):
    images, samples, _ = pixel_world
    splits = clean_splits(samples)
    with pytest.raises(ValueError, match="no hash and no pixels"):
        S.check_leakage(splits, images, samples=samples)
    with pytest.raises(ValueError, match="not among the samples"):
        S.check_leakage({**splits, "ghost": "test"}, images, samples=samples, phash_threshold=None)


def test_leak_through_a_chain_of_derivations():
    images = [{"image_id": "P"}, {"image_id": "Q", "parent_image_id": "P"},
              {"image_id": "R", "parent_image_id": "Q"}]
    samples = [{"sample_id": "a", "image_id": "P"}, {"sample_id": "c", "image_id": "R"}]
    leaks = S.check_leakage({"a": "train", "c": "val"}, images, samples=samples, phash_threshold=None)
    assert [(lk.kind, lk.image_ids) for lk in leaks] == [("parent", ("P", "R"))]
    assert leaks[0].detail == "family of P"
