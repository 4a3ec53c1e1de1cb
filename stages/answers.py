"""Reading a model's or a trace's answer: one parser (:func:`parse_answer`), one result (:class:`Answer`).

Every reader of a box in a reply comes here: the offline reasoning traces (:mod:`refforge.stages.cot`),
the LLM stages (:mod:`refforge.stages.llm_stages`: VLM grounding, hinted traces), the exports that read
their own traces back (:mod:`refforge.stages.export_formats`) and ``refforge eval``
(:mod:`refforge.stages.evaluate`). :func:`verify` compares an answer to the ground truth.

Readings (the options of :func:`parse_answer`)
----------------------------------------------
*strict* (the default; the trace reader). The last ``<answer>`` element is read when there is one,
otherwise the whole text. A ``[x1, y1, x2, y2]`` list anywhere in it, else ``(x1,y1),(x2,y2)``, is the
box (``{"bbox_2d": [...]}`` is read through its list); ``none`` / ``null`` / ``no object`` / ``[]`` /
``{}`` / an all-zero box / an answer opening with "no ", "not ", "there is no " are a ``rejection``;
two boxes or more, no box and no rejection, or nothing at all are ``unparseable``. The box is the
numbers as written.

*strict in a dialect* (``dialect=``, one of :data:`refforge.stages.scene.boxes.DIALECTS`; the LLM stages): the
strict reading, then ``{"bbox_2d": null}`` (or ``[]``, ``"none"``, ``"null"``; or a list of such
objects) is a rejection as well, and the box is mapped to pixels of the stored ``width`` x ``height``
image: ``"grid1000"`` reads the numbers on the 0-1000 grid of each side (``boxes.from_grid``; any
notation), the others read pixels of the image the model saw, ``sent_size`` (default: the stored
size), scaled to the stored size. The box is then clipped to the image; one with no area left is
``unparseable`` ("degenerate box [...]", the numbers as written).

*lenient* (``lenient=True``; ``refforge eval``, any model's reply in any dialect, whatever was asked):

1. ``<think>...</think>`` is dropped; the last ``<answer>`` element is used when there is one; an
   empty reply or element is ``empty``;
2. JSON (fenced or bare): ``[]`` / ``{}`` / ``{"bbox_2d": null}`` = rejection; a list of detections
   ``{"bbox_2d"|"bbox"|"box"|"bbox2d": [...]}`` takes the **highest-scored** one when every detection
   has a ``score`` / ``confidence`` / ``conf`` / ``prob``, else **the first** (the ``note`` says which
   and how many there were); a list of four numbers, or a list of such lists (first taken), is a box;
   JSON-ish detections that do not decode (cut off, single quotes) are read by their box keys;
3. otherwise the strict reading (numbers may have exponents here); several *identical* boxes count
   as one, several different ones are ``unparseable`` ("ambiguous");
4. a rejection must say so: a "none" word, ``[]``, a zero box or a rejection phrase ("there is no
   ...", "does not exist", "not present in the image", "cannot find"); refusals ("I'm sorry, I can't
   ...") are ``refusal``.

The box is the numbers as written (``evaluate.map_box`` maps them). Never raises.

>>> parse_answer("<think>...</think><answer>[10, 20, 110, 220]</answer>")
Answer(status='box', box=(10.0, 20.0, 110.0, 220.0), reason=None, note=None, raw='[10, 20, 110, 220]')
>>> parse_answer("<answer>none</answer>").status, parse_answer("<answer>[1, 2, 3]</answer>").reason
('rejection', 'no box and no rejection in the answer')
>>> parse_answer("<answer>[100, 100, 500, 500]</answer>", dialect="grid1000", width=640, height=480).box
(64.0, 48.0, 320.0, 240.0)
>>> parse_answer('[{"bbox_2d": [1, 1, 2, 2]}, {"bbox_2d": [5, 6, 7, 8]}]', lenient=True).note
'2 boxes in the answer; took the first'
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any

from refforge.llm.structured import looks_like_refusal
from refforge.stages.scene.boxes import DIALECTS, clip_boxes, from_grid
from refforge.stages.scene.boxes import iou as box_iou_scalar

__all__ = ["PARSE_STATUSES", "Answer", "parse_answer", "verify"]

Box = tuple[float, float, float, float]

PARSE_STATUSES: tuple[str, ...] = ("box", "rejection", "unparseable", "empty", "refusal")
"""What :func:`parse_answer` returns: ``box`` and ``rejection`` are answers, the others failures (the
strict readings give only ``box``, ``rejection`` and ``unparseable``). ``refforge eval`` adds failures
of its own (``invalid_box``, ``truncated``, ``request_error``, ``missing``) to the same type."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A parsed answer.

    ``status``: "box" (``box`` set), "rejection" (the answer says there is no such object) or a
    failure (see :data:`PARSE_STATUSES`); ``reason``: why a failure failed; ``note``: how a box was
    chosen among several ("3 boxes in the answer; took the first"); ``raw``: the text that was read
    (the last ``<answer>`` element, or the whole reply, stripped).
    """

    status: str
    box: Box | None = None
    reason: str | None = None
    note: str | None = None
    raw: str = ""


def parse_answer(text: str | None, *, dialect: str | None = None, width: float | None = None,
                 height: float | None = None, sent_size: tuple[float, float] | None = None,
                 lenient: bool = False) -> Answer:
    """Read the box or the rejection in ``text`` (see the module doc for the three readings).

    ``dialect`` (with ``width`` / ``height`` of the stored image and ``sent_size``, the size the model
    saw) maps the box to stored pixels; ``lenient=True`` is the eval's forgiving reading of any reply
    (it takes no dialect: ``evaluate.map_box`` maps its boxes).

    >>> parse_answer('<answer>{"bbox_2d": [0, 0, 0, 0]}</answer>').status
    'rejection'
    >>> parse_answer("<answer>[1, 2, 3, 4] [5, 6, 7, 8]</answer>").reason
    '2 boxes in the answer'
    >>> parse_answer("<answer>(20,20),(60,60)</answer>", dialect="pairs", width=320, height=240,
    ...              sent_size=(160, 120)).box
    (40.0, 40.0, 120.0, 120.0)
    >>> parse_answer('{"bbox_2d": null}', dialect="qwen_json", width=640, height=480).status
    'rejection'
    >>> parse_answer("[50, 50, 10, 10]", dialect="pixels", width=640, height=480).reason
    'degenerate box [50.0, 50.0, 10.0, 10.0]'
    >>> parse_answer('```json\\n[{"bbox_2d": [10, 20, 30, 40], "label": "cup"}]\\n```', lenient=True).box
    (10.0, 20.0, 30.0, 40.0)
    >>> [parse_answer(t, lenient=True).status for t in ("The cup does not exist in this image.",
    ...  "I'm sorry, but I can't help with that.", "Not sure.", "<think>hm</think><answer></answer>")]
    ['rejection', 'refusal', 'unparseable', 'empty']
    """
    if dialect is None and not lenient and width is None and height is None and sent_size is None:
        return _strict(text)  # type: ignore[arg-type]
    if lenient:
        if dialect is not None or width is not None or height is not None or sent_size is not None:
            raise ValueError("a lenient answer is read as written: map its box with evaluate.map_box")
        return _lenient(text)
    if dialect is None:
        raise ValueError("width, height and sent_size map a box from a dialect: give the dialect")
    if dialect not in DIALECTS:
        raise ValueError(f"unknown box dialect {dialect!r}; expected one of {DIALECTS}")
    return _in_dialect(_strict(text), dialect, width, height, sent_size)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ strict


_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_NUM = r"(-?\d+(?:\.\d+)?)"
_LIST4 = re.compile(rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]")
_PAIRS = re.compile(rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,?\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)")
_NONE = re.compile(r"^(none|null|no objects?|no such objects?|no match(es)?|nothing|not found|not present|n/?a|"
                   r"\[\s*\]|\{\s*\})$")
_NO = re.compile(r"^(there is )?no(t| such)? ")
_SPACE = re.compile(r"\s+")
# the answer the trace walk writes (boxes.format_box, "pixels"): read by one pattern, as the rest reads it
_OWN_BOX = re.compile(r"\[(-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?)\]")


def _strict(text: str) -> Answer:
    if "<" in text:
        found = _ANSWER.findall(text)
        if found:
            text = found[-1]
    # the pixel list the trace walk writes (boxes.format_box), read by one pattern as the rest reads it
    m = _OWN_BOX.fullmatch(text)
    if m is not None:
        box = (float(m[1]), float(m[2]), float(m[3]), float(m[4]))
        if box != (0.0, 0.0, 0.0, 0.0):
            return Answer("box", box, None, None, text)
    return _read(text.strip())


def _read(raw: str) -> Answer:
    """The strict reading of an answer's text (stripped)."""
    norm = _SPACE.sub(" ", raw.lower()).strip(" .!\"'`")
    if not norm:
        return Answer("unparseable", reason="empty answer", raw=raw)
    if _NONE.match(norm):
        return Answer("rejection", raw=raw)
    boxes = [tuple(float(v) for v in m) for m in _LIST4.findall(raw)]
    if not boxes:
        boxes = [(float(a), float(b), float(c), float(d)) for a, b, c, d in _PAIRS.findall(raw)]
    if len(boxes) > 1:
        return Answer("unparseable", reason=f"{len(boxes)} boxes in the answer", raw=raw)
    if boxes:
        box = boxes[0]
        if all(v == 0 for v in box):
            return Answer("rejection", raw=raw)
        return Answer("box", box, raw=raw)  # type: ignore[arg-type]
    if _NO.match(norm) or norm.startswith("there is no "):
        return Answer("rejection", raw=raw)
    return Answer("unparseable", reason="no box and no rejection in the answer", raw=raw)


# ------------------------------------------------------------------------------------------ dialects


def _json_null_box(raw: str) -> bool:
    """``{"bbox_2d": null}`` / ``{"bbox_2d": []}`` (or a list of such objects): a rejection."""
    m = re.search(r"[\[{].*[\]}]", raw, re.S)
    if m is None:
        return False
    try:
        data = json.loads(m.group(0))
    except ValueError:
        return False
    items = data if isinstance(data, list) else [data]
    if not items:
        return False
    return all(isinstance(d, dict) and "bbox_2d" in d and d["bbox_2d"] in (None, [], "none", "null")
               for d in items)


def _in_dialect(parsed: Answer, dialect: str, width: float | None, height: float | None,
                sent_size: tuple[float, float] | None) -> Answer:
    if _json_null_box(parsed.raw):
        return Answer("rejection", raw=parsed.raw)
    if parsed.status != "box" or parsed.box is None:
        return parsed
    box = parsed.box
    if dialect == "grid1000":
        if width is None or height is None:
            raise ValueError("the grid1000 dialect needs the image width and height")
        box = from_grid(box, width, height)
    elif sent_size is not None and width is not None and height is not None:
        sx, sy = width / sent_size[0], height / sent_size[1]
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if width is not None and height is not None:
        box = clip_boxes(box, width, height)
    if not (box[0] < box[2] and box[1] < box[3]):
        return Answer("unparseable", reason=f"degenerate box {list(parsed.box)}", raw=parsed.raw)
    return Answer("box", tuple(float(v) for v in box), raw=parsed.raw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ lenient


_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_NUM_E = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_LIST4_E = re.compile(rf"\[\s*{_NUM_E}\s*,\s*{_NUM_E}\s*,\s*{_NUM_E}\s*,\s*{_NUM_E}\s*\]")
_PAIRS_E = re.compile(rf"\(\s*{_NUM_E}\s*,\s*{_NUM_E}\s*\)\s*,?\s*\(\s*{_NUM_E}\s*,\s*{_NUM_E}\s*\)")
_NUMBER_E = re.compile(_NUM_E)
_BBOX_KEY = re.compile(r'"(?:bbox_2d|bbox|box)"\s*:\s*\[([^\]]*)\]')
_REJECT = re.compile(
    r"\b(there (is|are) no|no such|does not exist|doesn't exist|do not exist|not (present|visible|found|"
    r"shown|in the image|exist)|cannot (be )?(find|found|locate|see)|can't (find|locate|see)|"
    r"could not (find|locate)|unable to (find|locate)|no (matching|corresponding) object|nothing matches)\b")
_BOX_KEYS = ("bbox_2d", "bbox", "box", "bbox2d")
_SCORE_KEYS = ("score", "confidence", "conf", "prob")


def finite_number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def as_box(v: Any) -> Box | None:
    if isinstance(v, list | tuple) and len(v) == 4:
        nums = [finite_number(x) for x in v]
        if all(n is not None for n in nums):
            return tuple(nums)  # type: ignore[return-value]
    return None


def _box_or_rejection(box: Box, note: str | None = None) -> Answer:
    return Answer("rejection") if all(v == 0 for v in box) else Answer("box", box, note=note)


def _json_candidates(text: str) -> list[Any]:
    out = []
    chunks = [m.group(1) for m in _FENCE.finditer(text)] or [text]
    for chunk in chunks:
        s = chunk.strip()
        if not s or s[0] not in "[{":
            continue
        try:
            out.append(json.loads(s))
        except ValueError:
            continue
    return out


def _from_json(data: Any) -> Answer | None:
    """An answer from decoded JSON, or None when the JSON is not a grounding answer."""
    if isinstance(data, dict):
        if not data:
            return Answer("rejection")
        for k in _BOX_KEYS:
            if k in data:
                v = data[k]
                if v is None or v == []:
                    return Answer("rejection")
                box = as_box(v)
                if box is None:
                    return Answer("unparseable", reason=f"{k} is not four numbers: {json.dumps(v)[:80]}")
                return _box_or_rejection(box)
        return None
    if isinstance(data, list):
        if not data:
            return Answer("rejection")
        box = as_box(data)
        if box is not None:
            return _box_or_rejection(box)
        if all(isinstance(d, dict) for d in data):
            dets = []
            for d in data:
                key = next((k for k in _BOX_KEYS if k in d), None)
                if key is None:
                    continue
                b = as_box(d[key])
                if b is None:
                    if d[key] in (None, []):
                        continue
                    return Answer("unparseable", reason=f"{key} is not four numbers: {json.dumps(d[key])[:80]}")
                score = next((finite_number(d[k]) for k in _SCORE_KEYS if k in d), None)
                dets.append((b, score))
            if not dets:  # detections with a null / [] box say "nothing"; dicts without a box key say nothing
                return Answer("rejection") if any(k in d for d in data for k in _BOX_KEYS) else None
            if len(dets) == 1:
                return _box_or_rejection(dets[0][0])
            if all(s is not None for _, s in dets):
                best = max(range(len(dets)), key=lambda i: (dets[i][1], -i))
                return Answer("box", dets[best][0],
                              note=f"{len(dets)} boxes in the answer; took the highest-scored (#{best + 1})")
            return Answer("box", dets[0][0], note=f"{len(dets)} boxes in the answer; took the first")
        if all(as_box(d) is not None for d in data):
            boxes = [as_box(d) for d in data]
            note = None if len(set(boxes)) == 1 else f"{len(boxes)} boxes in the answer; took the first"
            return Answer("box", boxes[0], note=note)
    return None


def _lenient(text: str | None) -> Answer:
    if text is None or not str(text).strip():
        return Answer("empty", reason="the answer was empty")
    full = str(text)
    body = _THINK.sub(" ", full).strip() or full
    found = _ANSWER.findall(body)
    raw = (found[-1] if found else body).strip()
    if not raw:
        return Answer("empty", reason="the <answer> element is empty")
    return replace(_lenient_read(raw), raw=raw)


def _lenient_read(raw: str) -> Answer:
    for data in _json_candidates(raw):
        ans = _from_json(data)
        if ans is not None:
            return ans
    # JSON-ish detections that do not decode (cut off, single quotes): the bbox keys by regex
    keyed = [as_box([float(x) for x in _NUMBER_E.findall(m)]) for m in _BBOX_KEY.findall(raw)]
    if keyed and all(b is not None for b in keyed):
        note = None if len(set(keyed)) == 1 else f"{len(keyed)} boxes in the answer; took the first"
        return Answer("box", keyed[0], note=note)
    norm = _SPACE.sub(" ", raw.lower()).strip(" .!\"'`")
    parsed = _strict(f"<answer>{raw}</answer>")
    if parsed.status == "box":
        return Answer("box", parsed.box)
    # the strict reading also takes any answer opening with "not "/"no " as a rejection ("not sure ..."):
    # here a rejection must say so (a "none" word, [], a zero box, or a rejection phrase)
    if parsed.status == "rejection" and (_NONE.match(norm) or _REJECT.search(norm) or _LIST4_E.search(raw)
                                         or _PAIRS_E.search(raw)):
        return Answer("rejection")
    boxes = [tuple(float(v) for v in m) for m in _LIST4_E.findall(raw)] or \
            [tuple(float(v) for v in m) for m in _PAIRS_E.findall(raw)]
    if boxes:
        if len(set(boxes)) == 1:
            return _box_or_rejection(boxes[0])  # type: ignore[arg-type]
        return Answer("unparseable", reason=f"ambiguous: {len(set(boxes))} different boxes in the answer")
    if _REJECT.search(norm):  # before the refusal check: "I'm sorry, there is no green ball" is an answer
        return Answer("rejection")
    if looks_like_refusal(raw.strip()):
        return Answer("refusal", reason="the model declined in text")
    return Answer("unparseable", reason=parsed.reason or "no box and no rejection in the answer")


# ------------------------------------------------------------------------------------------ verification

_SEQUENCES = (tuple, list)


def verify(parsed: Answer, polarity: str, gt_box=None, iou_threshold: float = 0.5) -> tuple[str, float | None]:
    """``(verdict, iou)`` of a parsed answer against the ground truth.

    Positive samples: a box with IoU >= ``iou_threshold`` against ``gt_box`` is "correct", below it
    "wrong_box"; a rejection is "false_rejection" (IoU 0.0). Negative samples: a rejection is
    "correct_rejection", a box "false_positive" (IoU ``None`` for both). Any other status (a failure)
    is "unparseable" (IoU ``None``).

    >>> verify(parse_answer("<answer>[0, 0, 10, 10]</answer>"), "positive", (0, 0, 10, 12))
    ('correct', 0.8333333333333334)
    >>> verify(parse_answer("<answer>none</answer>"), "negative")
    ('correct_rejection', None)
    """
    if polarity not in ("positive", "negative"):
        raise ValueError(f"polarity must be 'positive' or 'negative', not {polarity!r}")
    status = parsed.status
    if status != "box" and status != "rejection":
        return "unparseable", None
    if polarity == "negative":
        return ("correct_rejection" if status == "rejection" else "false_positive"), None
    if gt_box is None:
        raise ValueError("a positive sample needs its gt_box")
    if status == "rejection":
        return "false_rejection", 0.0
    if type(gt_box) in _SEQUENCES and len(gt_box) == 4:  # the common forms, without a generator
        a, b, c, d = gt_box
        gt = (float(a), float(b), float(c), float(d))
    else:
        gt = tuple(float(v) for v in gt_box)
    score = box_iou_scalar(parsed.box, gt)  # type: ignore[arg-type]
    return ("correct" if score >= iou_threshold else "wrong_box"), score
