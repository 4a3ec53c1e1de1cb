"""The model-backed stage logic (rewrite, the negatives' llm backend, describe's VLM side, cot's VLM
backend) against the local OpenAI-protocol test server.

The server's handler answers like a model would for each prompt kind (it reads the request's
messages: the system prompt says which stage asks, the user text carries the expression, the word
or the hint, the images arrive as data URLs)."""

from __future__ import annotations

import base64
import doctest
import io
import json
import pickle
import re

import pytest
from PIL import Image, ImageDraw

from refforge.llm import LLMClient, LLMRequestError, ResponseCache
from refforge.stages import llm_common, rewrite
from refforge.stages.cot import vlm as cot_vlm
from refforge.stages.cot.vlm import CotSample, llm_traces
from refforge.stages.describe import vlm as describe_vlm
from refforge.stages.describe.vlm import MARK_COLOUR, describe_boxes, draw_mark, vlm_grounder
from refforge.stages.llm_common import prompt_version
from refforge.stages.negatives_text import llm_backend
from refforge.stages.negatives_text.edits import LexiconBackend, NegativeBackend, text_negatives
from refforge.stages.negatives_text.llm_backend import LLMNegativeBackend, negative_backend
from refforge.stages.rewrite import (
    RewriteItem,
    check_negative_rewrite,
    check_rewrite,
    rewrite_additions,
    rewrite_expressions,
)
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph
from refforge.stages.scene.query import Node, Position
from refforge.stages.scene.templates import template_hash
from refforge.testing import OpenAITestServer, fail, refusal

W, H = 320, 240
RED = (40.0, 40.0, 120.0, 120.0)
BLUE = (200.0, 100.0, 280.0, 200.0)


# ------------------------------------------------------------------------------------ the fake model


def _user_text(req) -> str:
    content = req.messages[1]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def _decode(url: str) -> Image.Image:
    head, _, payload = url.partition(",")
    assert head.startswith("data:image/") and head.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")


def _marked(img: Image.Image, box) -> bool:
    """Is the left edge of ``box`` (in this image's pixels) drawn in the mark colour?"""
    x, y = round(box[0]), round((box[1] + box[3]) / 2)
    return x < img.width and y < img.height and img.getpixel((x, y)) == MARK_COLOUR


REWRITES = {
    "the red ball to the left of the box": "the red ball on the left side of the box",
    "the red cup next to the table": "the cup beside the table",
    "the blue kite": "the big blue kite",
    # text negatives: the edit kept, the replaced word restored, the swap undone
    "the blue ball left of the box": "the blue ball on the left side of the box",
    "the kite left of the box": "the kite, not the ball, on the left of the box",
    "the blue ball next to the red box": "the red ball beside the blue box",
}

WORDS = {
    ("attribute", "red"): ["blue", "Green", "crimson", "red"],
    ("category", "ball"): ["kite", "sphere", "the box"],
    ("category", "box"): ["basket", "boxes"],
    ("relation", "left of"): ["to the right of", "beside", "above"],
}


def rewrite_answer(req):
    expr = re.search(r'Expression: "(.*?)"', _user_text(req)).group(1)
    if expr == "the green hat":
        return refusal()
    return json.dumps({"expression": REWRITES.get(expr, expr)})


def negatives_answer(req):
    text = _user_text(req)
    m = re.search(r'Replace the (?:\w+ attribute|object category|spatial relation) "(.*?)"', text)
    kind = "attribute" if "attribute" in m.group(0) else "category" if "category" in m.group(0) else "relation"
    if m.group(1) == "hat":
        return "Sure, here are some ideas: hats are nice."
    return json.dumps({"candidates": WORDS.get((kind, m.group(1)), [])})


def describe_answer(req):
    marked = _decode(req.image_urls()[0])
    if _marked(marked, RED):
        descs = [{"category": "attribute", "text": "the red square."},
                 {"category": "relation", "text": "the red square to the left of the blue square"}]
    elif _marked(marked, BLUE):
        descs = [{"category": "attribute", "text": "the blue square"}]  # no relation description
    else:  # the mark did not arrive: a model would describe something random
        descs = []
    return json.dumps({"descriptions": descs})


def ground_answer(req):
    img = _decode(req.image_urls()[0])
    text = _user_text(req)
    sx, sy = img.width / W, img.height / H
    if "red" not in text:
        return '{"bbox_2d": null}'
    if "0-1000 grid" in text:
        return '{"bbox_2d": [125, 167, 375, 500]}'
    return json.dumps({"bbox_2d": [round(v * s) for v, s in zip(RED, (sx, sy, sx, sy), strict=True)]})


def _dialect(text: str) -> str:
    if "0-1000 grid" in text:
        return "grid1000"
    if "(x1,y1),(x2,y2)" in text:
        return "pairs"
    if '{"bbox_2d"' in text:
        return "qwen_json"
    return "pixels"


def cot_answer(req):
    text = _user_text(req)
    expr = re.search(r'Referring expression: "(.*?)"', text).group(1)
    i = req.body.get("seed", 0)
    d = _dialect(text)
    think = f"<think>I look for {expr}; candidate {i} in {d}.</think>"
    if expr == "the purple circle":  # a negative
        return think + ["<answer>none</answer>", "<answer>[10, 10, 50, 50]</answer>",
                        '<answer>{"bbox_2d": null}</answer>'][i]
    if expr == "the garbled one":
        if i == 1:
            return refusal()
        return "<think>hmm</think>I think it is somewhere over there, probably."
    hint = [int(v) for v in re.findall(r"-?\d+", re.search(r"The answer is (.*?)\. Explain", text).group(1))]
    if i == 0:
        box = hint
    elif i == 1:  # close to the hint: correct, IoU < 1
        box = [hint[0] + 20, hint[1], hint[2] + 20, hint[3]]
    else:  # the wrong object
        box = [200, 100, 280, 200]
    if d == "grid1000" or d == "pixels":
        ans = f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}]"
    elif d == "pairs":
        ans = f"({box[0]},{box[1]}),({box[2]},{box[3]})"
    else:
        ans = json.dumps({"bbox_2d": box})
    return f"{think}<answer>{ans}</answer>"


JUDGED: list[str] = []


def judge_answer(req):
    text = _user_text(req)
    JUDGED.append(text)
    expr = re.search(r'Referring expression: "(.*?)"', text).group(1)
    return json.dumps({"best": 7 if expr == "the red block" else 1, "reason": "clearer steps"})


def handler(req):
    system = req.messages[0]["content"]
    if system.startswith("You rewrite"):
        return rewrite_answer(req)
    if system.startswith("You help build hard negative"):
        return negatives_answer(req)
    if system.startswith("You write referring expressions"):
        return describe_answer(req)
    if system.startswith("You are a visual grounding model: given"):
        return ground_answer(req)
    if system.startswith("You are a visual grounding model that explains"):
        return cot_answer(req)
    if system.startswith("You judge reasoning traces"):
        return judge_answer(req)
    return None


@pytest.fixture(scope="module")
def srv():
    with OpenAITestServer(handler=handler) as s:
        yield s


def _client(srv, **kw) -> LLMClient:
    return LLMClient(srv.base_url, "test-vlm", api_key_env=None, backoff_base_s=0.01, backoff_max_s=0.05,
                     repair_retries=0, **kw)


@pytest.fixture(scope="module")
def client(srv):
    c = _client(srv)
    yield c
    c.close()


@pytest.fixture(scope="module")
def small_client(srv):
    """Sends images at most 160 px on the longest side: coordinates must be mapped back."""
    c = _client(srv, image_longest_side=160)
    yield c
    c.close()


def scene() -> Image.Image:
    img = Image.new("RGB", (W, H), (200, 200, 200))
    d = ImageDraw.Draw(img)
    d.rectangle(RED, fill=(220, 30, 30))
    d.rectangle(BLUE, fill=(30, 30, 220))
    return img


# ------------------------------------------------------------------------------------------- rewrite


def test_doctests_run():
    attempted = 0
    for module in (llm_common, rewrite, llm_backend, describe_vlm, cot_vlm):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted > 0


def test_check_rewrite_accepts_paraphrases_and_names_what_is_lost():
    q = Node("ball", ("red", "small"), (("left of", Node("box", ("blue",))), ("on", Node("table"))))
    assert check_rewrite(q, "a tiny red ball resting on a table, on the left side of a blue box") == []
    assert check_rewrite(q, "the small red ball left of the blue box on top of the table") == []
    assert check_rewrite(q, "the small red ball beside the blue box on the table") == ["left of"]
    # "on the left of" is one mention of "left of": it does not also count as the "on"
    assert check_rewrite(q, "the small red ball on the left of the blue box") == ["on", "table"]
    assert check_rewrite(Node("shelf"), "the two bookshelves") == []
    two_red = Node("ball", ("red",), (("next to", Node("box", ("red",))),))
    assert check_rewrite(two_red, "a red ball by a box") == ["red"]
    assert check_rewrite(two_red, "a red ball by a red box") == []
    pos = Node("cup", position=Position("order", start="left", rank=1, count=3))
    assert check_rewrite(pos, "the second of the three cups from the left") == []
    assert check_rewrite(pos, "the leftmost cup") == ["second from the left of 3"]
    assert check_rewrite(Node("cup", position=Position("region", region="top-left")),
                         "the cup in the upper left corner") == []
    assert rewrite_additions(Node("ball", ("red",)), "the big red striped ball") == ["big", "striped"]


def test_rewrite_kept_dropped_and_refused(client):
    items = [
        RewriteItem("s1", "the red ball to the left of the box", Node("ball", ("red",), (("left of", Node("box")),))),
        RewriteItem("s2", "the red cup next to the table", Node("cup", ("red",), (("next to", Node("table")),))),
        RewriteItem("s3", "the green hat", Node("hat", ("green",))),
        RewriteItem("s4", "the blue kite", Node("kite", ("blue",))),
    ]
    out = rewrite_expressions(client, items, seed=3)
    assert [o.sample_id for o in out] == ["s1", "s2", "s3", "s4"]
    kept, lost, refused, added = out
    assert kept.kept and kept.text == "the red ball on the left side of the box"
    assert kept.source_text == items[0].text and kept.model == "test-vlm"
    assert not lost.kept and lost.text is None
    assert lost.drop.stage == "rewrite" and lost.drop.key == "s2"
    assert lost.drop.reason == "rewrite_lost" and lost.drop.detail == "red: the cup beside the table"
    assert refused.drop.reason == "refusal"
    assert added.drop.reason == "rewrite_added" and added.drop.detail.startswith("big: ")
    version = f"llm/rewrite.j2@{template_hash('llm/rewrite.j2')}"
    assert prompt_version("rewrite") == version
    assert {o.prompt_version for o in out} == {version}
    # offline: the text stays as it is
    offline = rewrite_expressions(None, items[:1], seed=3)
    assert offline[0].kept and offline[0].text == items[0].text and offline[0].model == "template"


def test_rewrite_of_a_text_negative_must_not_undo_its_edit(client):


    items = [
        RewriteItem("n1", "the blue ball left of the box", Node("ball", ("blue",), (("left of", Node("box")),)),
                    ("replace_attribute", "red->blue on node 1")),
        RewriteItem("n2", "the kite left of the box", Node("kite", (), (("left of", Node("box")),)),
                    ("replace_object", "ball->kite on node 1")),
        RewriteItem("n3", "the blue ball next to the red box",
                    Node("ball", ("blue",), (("next to", Node("box", ("red",))),)),
                    ("swap_attribute", "red<->blue between node 1 and node 2")),
    ]
    kept, restored, unswapped = rewrite_expressions(client, items, seed=3)
    assert kept.kept and kept.text == "the blue ball on the left side of the box"
    assert restored.drop.reason == "rewrite_restored" and restored.drop.detail.startswith("ball: ") and restored.drop.key == "n2"
    assert unswapped.drop.reason == "rewrite_reordered_swap" and unswapped.drop.detail.startswith("red, blue: ")
    assert unswapped.drop.detail == "red, blue: the red ball beside the blue box"
    # the original word may stay where the template itself has it (another node keeps it)
    assert check_negative_rewrite("replace_attribute", "red->blue on node 1", "the blue ball next to the red box",
                                  "a blue ball beside a red box") is None
    assert check_negative_rewrite("replace_object", "ball->kite on node 1", "the kite", "the kite, not a ball") \
        == "rewrite restored: ball"
    assert check_negative_rewrite("replace_relation", "left of->right of on R1 (node 1 -> node 2)",
                                  "the ball right of the box", "the ball to the left of the box") \
        == "rewrite restored: left of"
    assert check_negative_rewrite("swap_object", "ball<->box between node 1 and node 2",
                                  "the box next to the ball", "a box beside a ball") is None
    assert check_negative_rewrite("flip", "", "x", "y") is None


def test_request_failures_propagate(srv, client):
    srv.script(fail(401, "Incorrect API key provided."))
    with pytest.raises(LLMRequestError):
        rewrite_expressions(client, [RewriteItem("x", "the red kite", Node("kite", ("red",)))], seed=99)


# ----------------------------------------------------------------------------------------- negatives


def graph() -> SceneGraph:
    objs = [GObject("o0", "ball", (10, 10, 40, 40), ("red",)), GObject("o1", "ball", (200, 10, 230, 40), ("blue",)),
            GObject("o2", "box", (100, 10, 140, 40), ("white",))]
    rels = [GRelation("o0", "left of", "o2"), GRelation("o2", "right of", "o0"),
            GRelation("o1", "right of", "o2"), GRelation("o2", "left of", "o1")]
    return SceneGraph(W, H, objs, rels)


def test_llm_negatives_backend_is_verified_prefetched_and_cached(srv, tmp_path):
    g = graph()
    q1 = Node("ball", ("red",))
    q2 = Node("ball", ("red",), (("left of", Node("box")),))
    first = _client(srv, cache=ResponseCache(tmp_path / "llm.sqlite"))
    try:
        backend = negative_backend(first)
        assert isinstance(backend, LLMNegativeBackend) and isinstance(backend, NegativeBackend)
        n0 = srv.request_count
        assert backend.prefetch([q1, q2]) == 4  # red, ball, box, left of: one request per word
        assert srv.request_count - n0 == 4
        cands = text_negatives(g, q1, "the {A1} {O}", target_id="o0", backend=backend,
                               types=("replace_attribute",), per_type=3)
        # "blue ball" is an object of the image: not kept; "crimson" is not a colour the graph knows
        assert [c.text for c in cands] == ["the green ball"]
        assert srv.request_count - n0 == 4  # answered from the backend's memo
    finally:
        first.close()

    second = _client(srv, cache=ResponseCache(tmp_path / "llm.sqlite"))
    try:
        backend = LLMNegativeBackend(second)
        n0 = srv.request_count
        backend.prefetch([q1, q2])
        assert srv.request_count == n0  # a second run sends nothing
        assert second.usage()["negatives_text"]["cached"] == 4
        cands = text_negatives(g, q2, "the {A1} {O} to the left of the {O2}", target_id="o0", backend=backend,
                               per_type=3)
        # the proposals the graph can verify ("beside" is no predicate of the lexicon, "sphere" no category,
        # "box" is in the image) and, for "red ball left of the box", "blue" is fine: the blue ball is not left of it
        assert {c.text for c in cands} == {
            "the red kite to the left of the box", "the red ball to the left of the basket",
            "the blue ball to the left of the box", "the green ball to the left of the box",
            "the red ball to the right of the box", "the red ball above the box", "the red box to the left of the ball"}
        assert srv.request_count == n0
    finally:
        second.close()


def test_llm_negatives_garbled_answer_is_a_drop_and_falls_back(client):
    g = SceneGraph(W, H, [GObject("h", "hat", (10, 10, 40, 40), ("red",))], [])
    backend = LLMNegativeBackend(client, fallback=LexiconBackend(use_wordnet=False))
    cands = text_negatives(g, Node("hat"), "the {O}", target_id="h", backend=backend, types=("replace_object",))
    assert len(cands) == 1 and cands[0].negative_type == "replace_object"
    drops = backend.take_drops()
    assert [(d.stage, d.key, d.reason) for d in drops] == [("negatives_text", "llm:category:hat", "llm_unparseable")]
    assert backend.take_drops() == []
    again = pickle.loads(pickle.dumps(backend))  # Prefect/dask ship backends to workers
    assert again.model == "test-vlm" and again._get("category", "hat") is None  # the memo travels too
    again.client.close()


# ------------------------------------------------------------------------------------------ describe


def test_draw_mark_outlines_the_box():
    img = draw_mark(scene(), RED, 3)
    assert img.getpixel((40, 80)) == MARK_COLOUR and img.getpixel((119, 80)) == MARK_COLOUR
    assert img.getpixel((80, 80)) == (220, 30, 30)  # inside stays as it was


def test_describe_round_trip_kept_and_dropped(srv, client):
    def grounder(image, text):
        assert image.size == (W, H)
        if "red" in text:
            return RED
        return (240.0, 100.0, 320.0, 200.0)  # overlaps the blue square by a third

    n0 = srv.request_count
    out = describe_boxes(client, scene(), [("img/red", RED), ("img/blue", BLUE)], ["attribute", "relation"],
                         width=W, height=H, grounder=grounder)
    reqs = [r for r in srv.requests[n0:] if r.messages[0]["content"].startswith("You write referring")]
    assert len(reqs) == 2
    for r, box in zip(reqs, (RED, BLUE), strict=True):
        urls = r.image_urls()
        assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
        assert _marked(_decode(urls[0]), box)  # the Set-of-Mark image, box drawn in the mark colour
    assert [(o.box_id, o.category) for o in out] == [("img/red", "attribute"), ("img/red", "relation"),
                                                      ("img/blue", "attribute"), ("img/blue", "relation")]
    red_attr, red_rel, blue_attr, blue_rel = out
    assert red_attr.kept and red_attr.text == "the red square" and red_attr.iou == 1.0
    assert red_rel.kept and red_rel.text == "the red square to the left of the blue square"
    assert not blue_attr.kept and blue_attr.drop.reason == "round_trip_low_iou"
    assert blue_attr.drop.key == "img/blue/attribute" and blue_attr.drop.stage == "describe"
    assert blue_rel.drop.reason == "no_description"
    assert {o.prompt_version for o in out} == {prompt_version("describe")}


def test_vlm_grounder_maps_coordinates_back(srv, small_client):
    grounder = vlm_grounder(small_client)
    assert grounder(scene(), "the red square") == pytest.approx(RED)
    assert grounder(scene(), "the green triangle") is None
    r = srv.requests[-1]
    assert _decode(r.image_urls()[0]).size == (160, 120)
    grid = vlm_grounder(small_client, dialect="grid1000")
    assert grid(scene(), "the red square") == pytest.approx((40.0, 40.08, 120.0, 120.0))


def test_describe_with_the_vlm_grounder(client):
    out = describe_boxes(client, scene(), [("r", RED)], ["attribute", "relation"], width=W, height=H,
                         grounder=vlm_grounder(client))
    assert [(o.text, o.iou) for o in out] == [("the red square", 1.0),
                                              ("the red square to the left of the blue square", 1.0)]
    assert {o.ground_version for o in out} == {prompt_version("ground")}


# ----------------------------------------------------------------------------------------------- cot


def cot_samples(img):
    return [
        CotSample("pos", "the red square", "positive", RED, img, W, H),
        CotSample("neg", "the purple circle", "negative", None, img, W, H),
        CotSample("bad", "the garbled one", "positive", RED, img, W, H),
    ]


def test_llm_traces_rule_selection(client):
    out = llm_traces(client, cot_samples(scene()), k=3, dialect=("pixels", "grid1000", "qwen_json"))
    pos, neg, bad = out
    assert [t.dialect for t in pos] == ["pixels", "grid1000", "qwen_json"]
    assert [t.verdict for t in pos] == ["correct", "correct", "wrong_box"]
    assert pos[0].answer_box == RED and pos[0].iou == 1.0
    assert 0.5 <= pos[1].iou < 1.0
    assert [t.selected for t in pos] == [True, False, False] and pos.selection == "rule"
    assert {t.model for t in pos} == {"test-vlm"}
    assert {t.prompt_version for t in pos} == {prompt_version("cot")}
    assert [t.verdict for t in neg] == ["correct_rejection", "false_positive", "correct_rejection"]
    assert sum(t.selected for t in neg) == 1 and neg[0].selected
    # garbled answers are stored as unparseable and never selected; the refusal and the exact repeat are
    # drops, and so is the sample, which has no usable trace
    assert [t.verdict for t in bad] == ["unparseable"] and not bad[0].selected and bad.selection == "none"
    assert sorted((d.key, d.reason) for d in bad.drops) == [("bad", "no_usable_trace"), ("bad/1", "refusal"),
                                                            ("bad/2", "duplicate_trace")]
    (whole,) = [d for d in bad.drops if d.key == "bad"]
    assert whole.stage == "cot" and whole.detail == ("3 candidate(s): 0: unparseable (no box and no rejection in "
                                                     "the answer), 1: refusal, 2: duplicate_trace")


def test_llm_traces_never_select_an_unparseable_answer_beside_a_usable_one(srv):
    """Garbage beside a wrong box: the wrong box (read and verified) is selected, never the garbage."""
    def answer(req):
        if req.body.get("seed", 0) == 0:
            return "<think>hmm</think>I think it is somewhere over there, probably."
        return "<think>There.</think><answer>[200, 100, 280, 200]</answer>"

    with OpenAITestServer(handler=answer) as own:
        c = _client(own)
        try:
            (pos,) = llm_traces(c, [CotSample("p", "the red square", "positive", RED, scene(), W, H)], k=2)
            (only_garbage,) = llm_traces(c, [CotSample("g", "the red square", "positive", RED, scene(), W, H)],
                                         k=1)
        finally:
            c.close()
    assert [(t.verdict, t.selected) for t in pos] == [("unparseable", False), ("wrong_box", True)]
    assert pos.selection == "rule" and pos.drops == []
    assert [(t.verdict, t.selected) for t in only_garbage] == [("unparseable", False)]
    assert [(d.key, d.reason) for d in only_garbage.drops] == [("g", "no_usable_trace")]


def test_llm_traces_judge_chooses_among_correct_only(client):
    JUDGED.clear()
    img = scene()
    samples = [CotSample("pos", "the red square", "positive", RED, img, W, H),
               CotSample("pos2", "the red block", "positive", RED, img, W, H),
               CotSample("neg", "the purple circle", "negative", None, img, W, H)]
    pos, pos2, neg = llm_traces(client, samples, k=3, judge="llm", dialect=("pixels", "grid1000", "qwen_json"))
    assert len(JUDGED) == 3
    shown = next(j for j in JUDGED if '"the red square"' in j)
    assert "Trace 0:" in shown and "Trace 1:" in shown and "Trace 2:" not in shown
    assert "[200, 100, 280, 200]" not in shown  # the wrong candidate is never shown to the judge
    assert [t.selected for t in pos] == [False, True, False] and pos.selection == "llm"
    assert pos[1].judge_reason == "clearer steps" and pos.judge_prompt_version == prompt_version("judge")
    # the judge named no shown candidate: rule fallback, and a drop says so
    assert [t.selected for t in pos2] == [True, False, False] and pos2.selection == "rule"
    assert [d.reason for d in pos2.drops] == ["judge_chose_no_verified_candidate"]
    assert [t.verdict for t in neg] == ["correct_rejection", "false_positive", "correct_rejection"]
    assert [t.selected for t in neg] == [False, False, True] and neg.selection == "llm"


def test_llm_traces_hint_follows_the_resized_image(srv, small_client):
    n0 = srv.request_count
    (pos,) = llm_traces(small_client, [CotSample("p", "the red square", "positive", RED, scene(), W, H)], k=1)
    req = srv.requests[n0]
    assert "The answer is [20, 20, 60, 60]." in _user_text(req)  # pixels of the 160x120 image sent
    assert req.body["seed"] == 0 and req.body["temperature"] == 0.8
    assert pos[0].answer_box == RED and pos[0].verdict == "correct" and pos[0].selected
