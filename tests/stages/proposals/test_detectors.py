"""The proposals stage: the NMS rule, the stage's filters, the offline colour-region detector and the
model backends (GroundingDINO, open_clip) run on tiny random-initialised models saved to disk and
loaded back through the backends' own loading code."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from refforge.stages.proposals import detectors as proposals_module
from refforge.stages.proposals import nms as nms_module
from refforge.stages.proposals.detectors import (
    INSTALL_HINT,
    ColourRegionDetector,
    Proposal,
    ProposalParams,
    _components,
    filter_proposals,
    grounding_prompt,
    make_detector,
    make_tagger,
    match_label,
    propose,
    select_tags,
)
from refforge.stages.proposals.nms import labels_related, nms, nms_detailed
from refforge.stages.scene.boxes import box_area, box_iou, iou

NO_CONTAINMENT = 1.01  # an IoS threshold no pair reaches


def test_doctests():
    for module in (nms_module, proposals_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# NMS: hand-computed cases


def test_nms_empty_and_single():
    assert nms(np.zeros((0, 4)), []).tolist() == []
    assert nms([], [], []).tolist() == []
    assert nms([[1, 2, 3, 4]], [0.1], ["cat"]).tolist() == [0]


def test_nms_ties_broken_by_index_and_descending_order():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]]
    assert nms(boxes, [0.5, 0.5, 0.7, 0.5]).tolist() == [2, 0, 3]
    # the same boxes listed the other way round: the lower index still wins the tie
    assert nms(boxes[::-1], [0.5, 0.7, 0.5, 0.5]).tolist() == [1, 0, 2]


def test_nms_iou_threshold_is_inclusive():
    a, b = [0, 0, 10, 10], [5, 0, 15, 10]  # IoU = 50 / 150
    assert nms([a, b], [0.9, 0.8], iou=0.34).tolist() == [0, 1]
    assert nms([a, b], [0.9, 0.8], iou=1 / 3).tolist() == [0]
    c = [0, 0, 10, 20]  # IoU(a, c) = 100 / 200 exactly, and a lies inside c
    assert nms([c, a], [0.9, 0.8], iou=0.5, ios=NO_CONTAINMENT).tolist() == [0]
    assert nms([c, a], [0.9, 0.8], iou=0.51, ios=NO_CONTAINMENT).tolist() == [0, 1]


def test_nms_containment_only_suppresses_the_lower_scored_smaller_box():
    big, inner, half_in = [0, 0, 100, 100], [10, 10, 30, 30], [85, 0, 105, 20]  # IoS 1.0 and 0.75
    r = nms_detailed([big, inner, half_in], [0.9, 0.8, 0.7], ["cat"] * 3)
    assert r.keep.tolist() == [0, 2]
    assert r.suppressor.tolist() == [-1, 0, -1] and r.rule.tolist() == [0, 2, 0]
    assert nms([big, inner, half_in], [0.9, 0.8, 0.7], ["cat"] * 3, ios=0.75).tolist() == [0]
    # the small box scores higher: the big one is not inside it, both stay
    assert nms([big, inner], [0.5, 0.8], ["cat", "cat"]).tolist() == [1, 0]
    # containment needs the same label
    assert nms([big, inner], [0.9, 0.8], ["cat", "dog"]).tolist() == [0, 1]


def test_nms_related_labels_suppress_across_labels():
    a, b = [0, 0, 10, 10], [1, 0, 11, 10]  # IoU = 90 / 110
    assert nms([a, b], [0.8, 0.9], ["man", "young man"]).tolist() == [1]
    assert nms_detailed([a, b], [0.8, 0.9], ["man", "young man"]).rule.tolist() == [3, 0]
    assert nms([a, b], [0.8, 0.9], ["man", "woman"]).tolist() == [1, 0]
    assert nms([a, b], [0.8, 0.9], ["Young  Man", "young man"]).tolist() == [1]  # same label once normalised
    assert nms([a, b], [0.8, 0.9], ["sofa", "couch"]).tolist() == [1, 0]
    assert nms([a, b], [0.8, 0.9], ["sofa", "couch"], synonyms=[["couch", "sofa"]]).tolist() == [1]
    assert nms([a, b], [0.8, 0.9], ["cat", "dog"], class_agnostic=True).tolist() == [1]
    # related labels suppress by IoU only, not by containment
    assert nms([[0, 0, 100, 100], [0, 0, 20, 20]], [0.9, 0.8], ["young man", "man"]).tolist() == [0, 1]


def test_labels_related_whole_words():
    assert labels_related("man", "young man") and labels_related("young man", "man")
    assert labels_related("red car", "small red car")
    assert not labels_related("man", "woman") and not labels_related("car", "card")


def test_nms_merge_grows_kept_boxes_by_near_duplicates_only():
    boxes = [[10, 10, 20, 20], [11, 9, 21, 19], [12, 12, 14, 14], [60, 60, 70, 70]]
    labels = ["man", "young man", "man", "man"]
    r = nms_detailed(boxes, [0.9, 0.8, 0.7, 0.6], labels, merge=True)
    assert r.keep.tolist() == [0, 3]
    assert r.boxes[0].tolist() == [10, 9, 21, 20]  # union with the related-label duplicate
    assert r.boxes[3].tolist() == [60, 60, 70, 70]
    plain = nms_detailed(boxes, [0.9, 0.8, 0.7, 0.6], labels)
    assert plain.keep.tolist() == [0, 3] and plain.boxes.tolist() == boxes


def test_nms_rejects_bad_input():
    with pytest.raises(ValueError):
        nms([[0, 0, 1, 1]], [0.1, 0.2])
    with pytest.raises(ValueError):
        nms([[0, 0, 1, 1]], [float("nan")])
    with pytest.raises(ValueError):
        nms([[0, 0, 1, 1]], [0.3], ["a", "b"])


# ---------------------------------------------------------------------------------------------
# NMS: property test against an independent statement of the rule

LABELS = ["man", "young man", "woman", "dog"]
RELATED = {("man", "young man"), ("young man", "man")}


def _conflicts(bk, sk, lk, bi, si, li, iou_t, ios_t) -> bool:
    """Whether kept box k (ranked higher) suppresses box i, written from the rule's statement."""
    o = box_iou([bk], [bi])[0, 0]
    s = box_iou([bk], [bi], metric="ios")[0, 0]
    if lk == li:
        return o >= iou_t or (s >= ios_t and box_area([bi])[0] <= box_area([bk])[0])
    return (lk, li) in RELATED and o >= iou_t


coord = st.integers(0, 40)
box_st = st.tuples(coord, coord, st.integers(1, 30), st.integers(1, 30)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(box_st, st.sampled_from([0.1, 0.5, 0.5, 0.9, 0.3]), st.sampled_from(LABELS)),
                max_size=25),
       st.sampled_from([0.3, 0.5, 0.7]), st.sampled_from([0.6, 0.8, 1.0]))
def test_nms_property(items, iou_t, ios_t):
    boxes = [b for b, _, _ in items]
    scores = [s for _, s, _ in items]
    labels = [lab for _, _, lab in items]
    r = nms_detailed(boxes, scores, labels, iou=iou_t, ios=ios_t)
    keep = r.keep.tolist()
    rank = {i: (-scores[i], i) for i in range(len(items))}
    assert keep == sorted(keep, key=rank.get)
    kept = set(keep)
    for a_pos, a in enumerate(keep):
        for b in keep[a_pos + 1:]:
            assert not _conflicts(boxes[a], scores[a], labels[a], boxes[b], scores[b], labels[b], iou_t, ios_t)
    for i in range(len(items)):
        if i in kept:
            assert r.suppressor[i] == -1
            continue
        k = int(r.suppressor[i])
        assert k in kept and rank[k] < rank[i]
        assert _conflicts(boxes[k], scores[k], labels[k], boxes[i], scores[i], labels[i], iou_t, ios_t)


def test_plain_iou_nms_matches_torchvision():
    import torch
    from torchvision.ops import batched_nms

    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 200, (600, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (600, 2))], 1)
    scores = rng.permutation(600) / 600.0  # distinct scores
    label_ids = rng.integers(0, 3, 600)
    labels = [["cat", "dog", "car"][i] for i in label_ids]
    ours = nms(boxes, scores, labels, iou=0.5, ios=NO_CONTAINMENT)
    theirs = batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(label_ids), 0.5).numpy()
    assert 50 < len(ours) < 600
    assert ours.tolist() == theirs.tolist()


# ---------------------------------------------------------------------------------------------
# the stage: tag selection, filters, propose


class RecordingDetector:
    """A Detector double: records the labels it is asked for and returns fixed proposals."""

    def __init__(self, proposals: list[Proposal]):
        self.proposals, self.calls = proposals, []

    def detect(self, images, labels):
        self.calls.append([list(x) for x in labels])
        return [list(self.proposals) for _ in images]


def test_select_tags_orders_thresholds_dedups_and_caps():
    tags = [("Dog", 0.4), ("cat", 0.9), ("sky", 0.05), ("dog", 0.3), ("tree", 0.4), ("car", 0.2)]
    assert select_tags(tags, ProposalParams(tag_threshold=0.1)) == ["cat", "dog", "tree", "car"]
    assert select_tags(tags, ProposalParams(tag_threshold=0.1, max_tags=2)) == ["cat", "dog"]
    assert select_tags(tags, ProposalParams(tag_threshold=0.95)) == []


def test_filter_proposals_clips_filters_and_caps():
    params = ProposalParams(box_threshold=0.3, min_area_frac=0.01, max_area_frac=0.5, max_per_image=2)
    ps = [
        Proposal("cat", (-10, -10, 20, 20), 0.9),       # clipped to (0, 0, 20, 20): 4% of the image
        Proposal("cat", (0, 0, 19, 20), 0.8),           # duplicate of the first: suppressed
        Proposal("dog", (50, 50, 55, 55), 0.95),        # 0.25%: too small
        Proposal("dog", (0, 0, 90, 90), 0.95),          # 81%: too large
        Proposal("tree", (40, 40, 60, 60), 0.2),        # below box_threshold
        Proposal("car", (60, 0, 80, 30), 0.5),
        Proposal("bus", (0, 60, 30, 90), 0.4),          # beyond max_per_image
    ]
    out = filter_proposals(ps, 100, 100, params)
    assert [(p.name, p.box, p.score) for p in out] == [("cat", (0.0, 0.0, 20.0, 20.0), 0.9),
                                                       ("car", (60.0, 0.0, 80.0, 30.0), 0.5)]
    assert filter_proposals([], 100, 100, params) == []


def test_propose_label_sources():
    images = [Image.new("RGB", (100, 100)), Image.new("RGB", (100, 50))]
    found = [Proposal("cat", (0, 0, 40, 40), 0.9), Proposal("cat", (0, 0, 39, 40), 0.8)]
    det = RecordingDetector(found)
    out = propose(images, None, det, ProposalParams(), vocabulary=["Cat", "dog", "cat"])
    assert det.calls[-1] == [["cat", "dog"], ["cat", "dog"]]
    assert [[p.box for p in ps] for ps in out] == [[(0.0, 0.0, 40.0, 40.0)], [(0.0, 0.0, 40.0, 40.0)]]
    tagger = make_tagger("vocabulary", vocabulary=["b", "a", "c"])
    propose(images, tagger, det, ProposalParams(max_tags=2), vocabulary=["ignored"])
    assert det.calls[-1] == [["b", "a"], ["b", "a"]]
    propose(images, make_tagger("none"), det, ProposalParams())
    assert det.calls[-1] == [[], []]


def test_factories_reject_unknown_kinds():
    with pytest.raises(ValueError, match="unknown tagger"):
        make_tagger("ram")
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("yolo")
    with pytest.raises(ValueError):
        make_tagger("vocabulary", vocabulary=[])


def test_module_imports_and_runs_offline_without_torch():
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "torchvision", "transformers", "open_clip"):
            sys.modules[name] = None  # makes any import of them fail
        from PIL import Image
        from refforge.stages.proposals import detectors as p
        out = p.propose([Image.new("RGB", (64, 64))], None, p.make_detector("offline"), p.ProposalParams())
        assert out == [[]], out
        for make, kind, opts in ((p.make_detector, "grounding_dino", dict(model="x")),
                                 (p.make_tagger, "open_clip", dict(vocabulary=["a"], pretrained="x"))):
            try:
                make(kind, **opts)
            except ImportError as e:
                assert {INSTALL_HINT!r} in str(e), e
            else:
                raise AssertionError(kind)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------
# offline detector: colour regions


def test_components_hand_case():
    q = np.array([[1, 1, 0, 2],
                  [0, 1, 0, 2],
                  [1, 0, 0, 0],
                  [1, 1, 2, 2]])
    comp = _components(q)
    groups = {tuple(map(tuple, np.argwhere(comp == c))) for c in np.unique(comp)}
    expected = {((0, 0), (0, 1), (1, 1)), ((0, 2), (1, 2), (2, 1), (2, 2), (2, 3)), ((0, 3), (1, 3)),
                ((1, 0),), ((2, 0), (3, 0), (3, 1)), ((3, 2), (3, 3))}
    assert groups == expected


def test_components_spiral_is_one_region():
    q = np.zeros((21, 21), dtype=int)
    q[1::4, 1:-1] = 1  # horizontal bars joined alternately at the right and left ends
    for k, row in enumerate(range(1, 17, 4)):
        q[row:row + 5, -2 if k % 2 == 0 else 1] = 1
    comp = _components(q)
    assert len(np.unique(comp[q == 1])) == 1


RECTS = [((30, 40, 130, 110), (200, 30, 30)), ((180, 60, 260, 200), (40, 160, 60)),
         ((60, 150, 150, 220), (30, 60, 200))]


def _rect_image(size=(320, 240), noise=0.0, seed=0, rects=RECTS) -> Image.Image:
    img = Image.new("RGB", size, (225, 222, 215))
    draw = ImageDraw.Draw(img)
    for (x1, y1, x2, y2), colour in rects:
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)  # PIL's rectangle includes x2, y2
    if noise:
        arr = np.asarray(img, dtype=np.float64)
        arr += np.random.default_rng(seed).normal(0, noise, arr.shape)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return img


def _recovered(props: list[Proposal], rects) -> list[float]:
    return [max((iou(p.box, box) for p in props), default=0.0) for box, _ in rects]


@pytest.mark.parametrize("noise", [0.0, 8.0])
def test_colour_regions_recover_rectangles(noise):
    img = _rect_image(noise=noise)
    [props] = propose([img], None, make_detector("offline"), ProposalParams())
    assert min(_recovered(props, RECTS)) >= 0.8
    assert all(p.name == "object" and p.origin == "detector" and 0.35 <= p.score <= 1 for p in props)
    assert all(0 <= p.box[0] < p.box[2] <= 320 and 0 <= p.box[1] < p.box[3] <= 240 for p in props)
    assert len(props) <= 6  # the three rectangles, not a cloud of fragments


def test_colour_regions_map_back_from_the_shrunk_image():
    scale = 3
    rects = [((x1 * scale, y1 * scale, x2 * scale, y2 * scale), c) for (x1, y1, x2, y2), c in RECTS]
    img = _rect_image(size=(320 * scale, 240 * scale), rects=rects)
    det = ColourRegionDetector(max_side=200)
    [props] = propose([img], None, det, ProposalParams())
    assert min(_recovered(props, rects)) >= 0.95
    assert det.detect([img, img], [[], []])[1] == det.regions(img)


def test_colour_regions_score_contrast():
    faint = _rect_image(rects=[((30, 40, 130, 110), (213, 222, 215))])  # RGB distance 12
    strong = _rect_image(rects=[((30, 40, 130, 110), (20, 20, 20))])
    det = ColourRegionDetector(merge_tol=0)
    assert not [p for p in ColourRegionDetector().regions(faint) if iou(p.box, (30, 40, 130, 110)) > 0.9]
    best = [max(p.score for p in det.regions(im) if iou(p.box, (30, 40, 130, 110)) > 0.9) for im in (faint, strong)]
    assert best[0] < 0.35 < 0.9 < best[1]


# ---------------------------------------------------------------------------------------------
# GroundingDINO: a tiny random model saved to disk

GD_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "cat", "dog", "traffic", "light", "man", "young",
            "person", "red", "car", "tree"]
GD_MAX_TEXT = 16


@pytest.fixture(scope="module")
def gd_path(tmp_path_factory):
    import torch
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    root = tmp_path_factory.mktemp("gdino")
    (root / "vocab").mkdir()
    (root / "vocab" / "vocab.txt").write_text("\n".join(GD_WORDS) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(root / "vocab")
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=64, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(GD_WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=12, encoder_n_points=1, decoder_n_points=1,
        max_text_len=GD_MAX_TEXT)
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 96, "longest_edge": 128}),
        tokenizer=tokenizer)
    out = root / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def gd_images():
    rng = np.random.default_rng(0)
    sizes = [(120, 90), (120, 90), (50, 70), (120, 90)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


GD_LABELS = [["cat"], ["traffic light", "man", "young man", "tree", "car"], ["dog", "red"], ["person", "cat"]]


def test_grounding_prompt_format():
    assert grounding_prompt(["Cat", " traffic  light ", "dog."]) == "cat . traffic light . dog ."


def test_match_label():
    labels = ["man", "young man", "traffic light"]
    assert match_label("young man", labels) == "young man"
    assert match_label("Man", labels) == "man"
    assert match_label("young", labels) == "young man"
    assert match_label("light [SEP]", labels) == "traffic light"
    assert match_label("cat", labels) is None and match_label("", labels) is None


def test_grounding_dino_chunks_fit_the_text_limit(gd_path):
    det = make_detector("grounding_dino", model=gd_path)
    assert det.max_text_len == GD_MAX_TEXT
    labels = ["cat", "dog", "traffic light", "man", "young man", "tree", "car", "person", "red"]
    chunks = det.chunks(labels)
    assert chunks == [["cat", "dog", "traffic light", "man", "young man", "tree"], ["car", "person", "red"]]
    for chunk in chunks:
        assert len(det.processor.tokenizer(grounding_prompt(chunk))["input_ids"]) <= GD_MAX_TEXT


def test_grounding_dino_detects_every_chunk(gd_path, gd_images):
    det = make_detector("grounding_dino", model=gd_path, box_threshold=0.0, text_threshold=0.0)
    labels = ["cat", "dog", "traffic light", "man", "young man", "tree", "car", "person", "red"]
    [found] = det.detect(gd_images[:1], [labels])
    # every query of both passes comes back; with text_threshold 0 a phrase holds its whole
    # prompt, which maps to the first label with the most words in it
    assert len(found) == 2 * 12
    assert {p.name for p in found[:12]} == {"traffic light"} and {p.name for p in found[12:]} == {"car"}
    everything = det.detect(gd_images[:1], [labels])
    strict = make_detector("grounding_dino", model=gd_path, box_threshold=0.0, text_threshold=1.0)
    assert strict.detect(gd_images[:1], [labels]) == [[]]  # no phrase token passes: all dropped
    assert everything == [found]


def test_grounding_dino_boxes_are_pixels_of_the_original_image(gd_path, gd_images):
    import torch

    det = make_detector("grounding_dino", model=gd_path, box_threshold=0.0, text_threshold=0.0)
    img = gd_images[2]  # 50 x 70, resized by the processor to 96 x 134 -> 91 x 128
    [found] = det.detect([img], [["dog", "red"]])
    inputs = det.processor(images=[img], text=["dog . red ."], return_tensors="pt")
    with torch.inference_mode():
        raw = det.model(**inputs)
    cx, cy, w, h = raw.pred_boxes[0].numpy().T
    expected = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * [50, 70, 50, 70]
    expected = np.clip(expected, 0, [50, 70, 50, 70])
    scores = torch.sigmoid(raw.logits[0]).max(-1).values.numpy()
    assert len(found) == 12
    np.testing.assert_allclose([p.box for p in found], expected, atol=1e-3)
    np.testing.assert_allclose([p.score for p in found], scores, atol=1e-5)


def test_grounding_dino_thresholds_and_labels(gd_path, gd_images):
    low = make_detector("grounding_dino", model=gd_path, box_threshold=0.0, text_threshold=0.3)
    high = make_detector("grounding_dino", model=gd_path, box_threshold=0.5, text_threshold=0.3)
    a, b = low.detect(gd_images, GD_LABELS), high.detect(gd_images, GD_LABELS)
    assert sum(map(len, a)) > sum(map(len, b)) > 0
    for labels, ps_low, ps_high in zip(GD_LABELS, a, b, strict=True):
        assert {p.name for p in ps_low} <= set(labels)
        assert ps_high == [p for p in ps_low if p.score > 0.5]


def test_grounding_dino_batching_equals_one_by_one(gd_path, gd_images):
    one = make_detector("grounding_dino", model=gd_path, box_threshold=0.2, text_threshold=0.2, batch_size=1)
    four = make_detector("grounding_dino", model=gd_path, box_threshold=0.2, text_threshold=0.2, batch_size=4)
    a, b = one.detect(gd_images, GD_LABELS), four.detect(gd_images, GD_LABELS)
    assert sum(map(len, a)) > 0
    for x, y in zip(a, b, strict=True):
        assert [p.name for p in x] == [p.name for p in y]
        np.testing.assert_allclose([p.box for p in x], [p.box for p in y], atol=1e-3)
        np.testing.assert_allclose([p.score for p in x], [p.score for p in y], atol=1e-5)


def test_propose_with_grounding_dino(gd_path, gd_images):
    params = ProposalParams(box_threshold=0.3, max_per_image=5, min_area_frac=0.0)
    det = make_detector("grounding_dino", model=gd_path, box_threshold=params.box_threshold,
                        text_threshold=params.text_threshold)
    vocab = ["cat", "dog", "man", "young man"]
    out = propose(gd_images, make_tagger("vocabulary", vocabulary=vocab), det, params)
    assert len(out) == 4 and sum(map(len, out)) > 0
    for img, ps in zip(gd_images, out, strict=True):
        assert len(ps) <= 5 and {p.name for p in ps} <= set(vocab)
        assert [p.score for p in ps] == sorted((p.score for p in ps), reverse=True)
        assert all(0 <= p.box[0] <= p.box[2] <= img.width and 0 <= p.box[1] <= p.box[3] <= img.height for p in ps)
        keep = nms([p.box for p in ps], [p.score for p in ps], [p.name for p in ps])
        assert keep.tolist() == list(range(len(ps)))  # NMS already ran: nothing left to suppress


# ---------------------------------------------------------------------------------------------
# open_clip: a tiny random model registered as a config, its weights saved to a file

CLIP_NAME = "refforge-tiny-clip"
TAGS = ["cat", "dog", "traffic light", "tree", "red car"]


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / f"{CLIP_NAME}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root)
    torch.manual_seed(1)
    model = open_clip.create_model(CLIP_NAME, pretrained=None)
    path = root / "tiny.pt"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def clip_images():
    return [Image.new("RGB", (50, 40), (230, 20, 20)), Image.new("RGB", (30, 80), (20, 20, 230)),
            _rect_image(size=(64, 48), rects=[((5, 5, 30, 30), (0, 200, 0))])]


def _reference_scores(ckpt, images, scoring):
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_NAME, pretrained=None)
    model.load_state_dict(torch.load(ckpt))
    model.eval()
    tok = open_clip.get_tokenizer(CLIP_NAME)
    with torch.no_grad():
        t = model.encode_text(tok([f"a photo of a {x}" for x in TAGS]))
        v = model.encode_image(torch.stack([preprocess(im) for im in images]))
        t, v = t / t.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True)
        sim = v @ t.T
        if scoring == "softmax":
            sim = (model.logit_scale.exp() * sim).softmax(-1)
    return sim.numpy()


@pytest.mark.parametrize("scoring", ["softmax", "cosine"])
def test_open_clip_tagger_scores(clip_ckpt, clip_images, scoring):
    tagger = make_tagger("open_clip", vocabulary=TAGS, model=CLIP_NAME, pretrained=clip_ckpt, scoring=scoring,
                         batch_size=2)
    expected = _reference_scores(clip_ckpt, clip_images, scoring)
    np.testing.assert_allclose(tagger.scores(clip_images), expected, atol=1e-5)
    tags = tagger.tags(clip_images)
    for row, got in zip(expected, tags, strict=True):
        assert [t for t, _ in got] == [TAGS[i] for i in np.argsort(-row, kind="stable")]
        np.testing.assert_allclose([s for _, s in got], np.sort(row)[::-1], atol=1e-5)
    if scoring == "softmax":
        np.testing.assert_allclose(expected.sum(1), 1.0, atol=1e-5)


def test_open_clip_tagger_caches_text_and_batches(clip_ckpt, clip_images):
    tagger = make_tagger("open_clip", vocabulary=TAGS, model=CLIP_NAME, pretrained=clip_ckpt, top_k=2,
                         batch_size=1)
    calls = []
    encode_text = tagger.model.encode_text
    tagger.model.encode_text = lambda *a, **k: calls.append(1) or encode_text(*a, **k)
    first = tagger.tags(clip_images)
    assert tagger.tags(clip_images[:1]) == first[:1]
    assert len(calls) == 1
    assert all(len(t) == 2 for t in first)
    tagger.batch_size = 3
    again = tagger.tags(clip_images)
    assert [[t for t, _ in row] for row in again] == [[t for t, _ in row] for row in first]
    np.testing.assert_allclose([[s for _, s in row] for row in again], [[s for _, s in row] for row in first],
                               atol=1e-5)


def test_propose_with_open_clip_tagger(clip_ckpt, clip_images):
    tagger = make_tagger("open_clip", vocabulary=TAGS, model=CLIP_NAME, pretrained=clip_ckpt)
    params = ProposalParams(max_tags=3, tag_threshold=0.15)
    det = RecordingDetector([])
    propose(clip_images, tagger, det, params)
    expected = [[t for t, s in row if s >= 0.15][:3] for row in tagger.tags(clip_images)]
    assert det.calls == [expected]


def test_open_clip_tagger_refuses_random_weights():
    with pytest.raises(ValueError, match="pretrained"):
        make_tagger("open_clip", vocabulary=TAGS, model=CLIP_NAME)
