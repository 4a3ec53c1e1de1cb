"""LLM/VLM stage logic: rewrite, negatives (llm backend), describe, cot (llm backend).

Each stage is a function over plain inputs that takes an :class:`~refforge.llm.LLMClient` (or
None, where an offline equivalent exists) and returns one outcome per unit of work: a record or a
:class:`~refforge.schemas.Drop`. Nothing here writes files; the flows do.

Prompts are the Jinja templates ``prompts/llm/*.j2``. Every request carries
``prompt_version = "<template name>@<template_hash>"`` (part of the response-cache key, so editing
a prompt re-asks the model) and every outcome returns the same string.

Failure policy (all stages):

* an unusable answer (the client's :class:`~refforge.llm.LLMOutputError` after its repair retries:
  "refusal", "empty", "unparseable", "schema_mismatch", "truncated") or an answer that fails the
  stage's own check becomes a drop with a reason: it never raises;
* a failed request (:class:`~refforge.llm.LLMRequestError`: the endpoint down past the retries,
  the rate-limit budget spent, bad credentials) propagates, after every answer of the batch that
  did arrive was cached, so a retried task pays only for what is missing.

Stages
------
``rewrite_expressions``  template expression -> natural language, checked by :func:`check_rewrite`
                         (nothing of the path lost) and :func:`rewrite_additions` (no attribute added).
``LLMNegativeBackend``   a :class:`~refforge.stages.negatives.NegativeBackend` whose proposals come
                         from the model; ``text_negatives`` verifies them against the graph as usual.
``describe_boxes``       Set-of-Mark description of proposal boxes, one per task category, kept only
                         when grounding the text again lands on the box (IoU >= 0.5).
``llm_traces``           K hinted reasoning traces per sample, parsed in the dialect asked for,
                         verified, the best selected by rule or by an LLM judge.
"""

from __future__ import annotations

import io
import json
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from refforge.llm import ChatRequest, ChatResult, LLMClient, LLMOutputError
from refforge.schemas import Drop
from refforge.stages import cot
from refforge.stages.boxes import DIALECTS, clip_boxes, format_box, from_grid, iou
from refforge.stages.cot import ParsedAnswer, Trace
from refforge.stages.lexicon import (
    ATTRIBUTE_FAMILIES,
    ATTRIBUTE_FAMILY,
    CATEGORIES,
    NEGATIVE_CATEGORIES,
    RELATION_ALTERNATIVES,
    RELATIONS,
    order_attributes,
    plural,
)
from refforge.stages.negatives import NEGATIVE_TYPES, LexiconBackend, NegativeBackend, ReplacementContext
from refforge.stages.query import Node, Position
from refforge.stages.templates import load_template, template_hash

__all__ = [
    "ATTRIBUTE_SYNONYMS",
    "CATEGORY_SYNONYMS",
    "PROMPTS",
    "RELATION_PARAPHRASES",
    "CotCandidates",
    "CotSample",
    "DescribeOutcome",
    "LLMNegativeBackend",
    "LLMTrace",
    "RewriteItem",
    "RewriteOutcome",
    "VLMGrounder",
    "check_negative_rewrite",
    "check_rewrite",
    "describe_boxes",
    "draw_mark",
    "llm_traces",
    "negative_backend",
    "parse_answer",
    "prompt_version",
    "prompt_versions",
    "rewrite_additions",
    "rewrite_expressions",
    "vlm_grounder",
]

Box = tuple[float, float, float, float]

PROMPTS: dict[str, str] = {
    "rewrite": "llm/rewrite.j2",
    "negatives": "llm/negatives.j2",
    "describe": "llm/describe.j2",
    "ground": "llm/ground.j2",
    "cot": "llm/cot.j2",
    "judge": "llm/judge.j2",
}


def prompt_version(name: str) -> str:
    """``"<template name>@<sha256 of the template>"`` for a key of :data:`PROMPTS` or a template name."""
    name = PROMPTS.get(name, name)
    return f"{name}@{template_hash(name)}"


def prompt_versions() -> dict[str, str]:
    """``{template name: sha256}`` of every LLM prompt (for the run file's provenance)."""
    return {name: template_hash(name) for name in PROMPTS.values()}


def _macros(name: str):
    return load_template(PROMPTS[name]).module


def _messages(system: str, user: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system.strip()},
            {"role": "user", "content": user.strip() if isinstance(user, str) else user}]


def _extra(seed: int | None) -> dict[str, Any] | None:
    return None if seed is None else {"seed": int(seed)}


def _drop(stage: str, key: str, reason: str, detail: str | None = None) -> Drop:
    return Drop(stage=stage, key=key, reason=reason, detail=(detail[:500] if detail else None))


def _model_of(result: ChatResult, client: LLMClient) -> str:
    return result.model or client.model


# ===================================================================================== rewrite check

# Paraphrases the checker accepts for a relation (normalised text: lowercase words, single spaces).
# "to the left of", "on the left of", "on the left side of" all contain "left of" / "left side of".
RELATION_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "left side of", "left hand side of", "to the left of", "on the left of",
                "on the left side of", "on the left hand side of", "at the left of"),
    "right of": ("right of", "right side of", "right hand side of", "to the right of", "on the right of",
                 "on the right side of", "on the right hand side of", "at the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "beneath", "underneath", "lower than"),
    "under": ("under", "underneath", "beneath"),
    "next to": ("next to", "beside", "besides", "by", "alongside", "adjacent to", "close to", "near"),
    "near": ("near", "close to", "next to", "beside", "by", "nearby"),
    "far from": ("far from", "far away from", "distant from", "away from"),
    "on": ("on", "on top of", "onto", "upon", "atop", "resting on", "sitting on", "standing on", "lying on",
           "placed on"),
    "inside": ("inside", "in", "within", "inside of", "contained in"),
    "in": ("in", "inside", "within"),
    "in front of": ("in front of",),
    "behind": ("behind", "in back of"),
    "sitting on": ("sitting on", "seated on"),
    "standing on": ("standing on",),
    "holding": ("holding", "holds"),
    "wearing": ("wearing", "wears", "dressed in"),
    "carrying": ("carrying", "carries"),
    "riding": ("riding", "rides", "riding on"),
    "eating": ("eating", "eats"),
    "looking at": ("looking at", "looks at", "watching"),
}

# Attribute words the checker also accepts (and that rewrite_additions recognises).
ATTRIBUTE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "gray": ("grey",),
    "large": ("big", "huge", "larger", "bigger"),
    "small": ("little", "tiny", "smaller"),
    "medium": ("medium sized", "mid sized", "medium size", "middle sized"),
    "striped": ("stripy", "stripes", "stripe", "stripey"),
    "dotted": ("polka dot", "polka dotted", "spotted", "dots", "spotty"),
    "checkered": ("checked", "chequered", "checkerboard", "plaid", "checks"),
    "plain": ("solid", "unpatterned", "patternless", "solid colored", "solid coloured"),
    "wooden": ("wood",),
    "metal": ("metallic",),
    "fabric": ("cloth",),
}

# Category words the checker also accepts. Kept small on purpose: a word here must never name
# another category of the lexicon (a "mug" is not a "cup" to the negatives stage).
CATEGORY_SYNONYMS: dict[str, tuple[str, ...]] = {
    "plant": ("houseplant", "potted plant", "pot plant"),
    "shelf": ("shelving", "bookshelf", "bookshelves", "bookcase", "shelf unit"),
    "umbrella": ("parasol",),
    "television": ("tv", "tv set"),
    "phone": ("cellphone", "cell phone", "mobile phone", "smartphone"),
    "airplane": ("plane", "aeroplane", "aircraft"),
    "motorcycle": ("motorbike",),
    "bicycle": ("bike",),
    "couch": ("sofa",),
    "donut": ("doughnut",),
    "man": ("guy", "gentleman"),
    "woman": ("lady",),
}

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve")
_ORDINAL_WORDS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_SIDE_WORDS = {"left": ("left",), "right": ("right",), "top": ("top", "upper", "highest"),
               "bottom": ("bottom", "lower", "lowest")}
_REGION_WORDS = {"top": ("top", "upper"), "bottom": ("bottom", "lower"), "left": ("left",), "right": ("right",),
                 "center": ("center", "centre", "middle")}


def _norm(text: str) -> str:
    """Lowercase words separated by single spaces; possessive 's and punctuation removed."""
    t = re.sub(r"['\u2019]s\b", "", text.lower())
    return " ".join(re.sub(r"[^a-z0-9]+", " ", t).split())


def _phrase_rx(phrase: str) -> re.Pattern[str]:
    return re.compile(r"(?<![a-z0-9])" + re.escape(_norm(phrase)) + r"(?![a-z0-9])")


def _alt_rx(words: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in words) + ")"


@dataclass
class _Req:
    label: str
    patterns: list[re.Pattern[str]]
    consume: bool = True  # claims its words, so two constraints cannot share one mention


def _category_req(category: str, synonyms: Mapping[str, Sequence[str]]) -> _Req:
    words = {category, plural(category), *synonyms.get(category, ())}
    words |= {plural(w) for w in synonyms.get(category, ())}
    return _Req(category, [_phrase_rx(w) for w in sorted(words, key=len, reverse=True)])


def _attribute_req(attr: str) -> _Req:
    words = {attr, *ATTRIBUTE_SYNONYMS.get(attr, ())}
    return _Req(attr, [_phrase_rx(w) for w in sorted(words, key=len, reverse=True)])


def _relation_req(pred: str) -> _Req:
    words = {pred, RELATIONS.get(pred, pred), *RELATION_PARAPHRASES.get(pred, ())}
    return _Req(pred, [_phrase_rx(w) for w in sorted(words, key=len, reverse=True)])


def _ordinal(k: int) -> str:
    """The ordinal word of rank ``k`` (0 = "first")."""
    return _ORDINAL_WORDS[k] if k < len(_ORDINAL_WORDS) else f"{k + 1}th"


def _position_label(pos: Position) -> str:
    if pos.kind == "region":
        return str(pos.region)
    start = pos.start or "left"
    k = pos.rank or 0
    most = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}[start]
    head = most if k == 0 else f"{_ordinal(k)} from the {start}"
    return head + (f" of {pos.count}" if pos.count is not None else "")


def _position_reqs(pos: Position) -> list[_Req]:
    label = _position_label(pos)
    if pos.kind == "region":
        parts = str(pos.region).split("-")
        # every part of the cell must be named ("top left": top and left), in any order
        return [_Req(label, [re.compile(r"(?<![a-z0-9])" + _alt_rx(_REGION_WORDS.get(p, (p,))) + r"(?![a-z0-9])")],
                     consume=False) for p in parts]
    start = pos.start or "left"
    side = _alt_rx(_SIDE_WORDS[start])
    k = pos.rank or 0
    if k == 0:
        rx = (rf"\b{side} ?most\b|\b(?:furthest|farthest|far|very|most|extreme) (?:to )?(?:the )?{side}\b|"
              rf"\b(?:first|1st)\b.*\bfrom (?:the )?{side}\b|\b(?:closest|nearest) to (?:the )?{side}\b|"
              rf"\b{side}est\b")
    else:
        ordinal = _ordinal(k)
        suffix = {1: "nd", 2: "rd"}.get(k, "th")
        rx = rf"\b(?:{ordinal}|{k + 1}{suffix})\b.*\b{side}\b|\b{side}\b.*\b(?:{ordinal}|{k + 1}{suffix})\b"
    reqs = [_Req(label, [re.compile(rx)], consume=False)]
    if pos.count is not None:
        words = [str(pos.count)] + ([_NUMBER_WORDS[pos.count]] if pos.count < len(_NUMBER_WORDS) else [])
        reqs.append(_Req(label, [re.compile(r"\b" + _alt_rx(words) + r"\b")], consume=False))
    return reqs


def _requirements(query: Node, synonyms: Mapping[str, Sequence[str]], reqs: list[_Req] | None = None
                  ) -> list[_Req]:
    """The requirements of ``query`` and its anchors, depth first, appended to ``reqs``."""
    if reqs is None:
        reqs = []
    reqs.append(_category_req(query.category, synonyms))
    reqs.extend(_attribute_req(a) for a in order_attributes(list(query.attributes)))
    if query.position is not None:
        reqs.extend(_position_reqs(query.position))
    for pred, child in query.relations:
        reqs.append(_relation_req(pred))
        _requirements(child, synonyms, reqs)
    return reqs


def _satisfied(reqs: list[_Req], text: str, budget: int = 20000) -> list[bool]:
    """Which requirements the text meets, with consuming ones matched to disjoint mentions
    (the assignment that meets the most, found by a bounded backtracking search)."""
    # a mention is claimed whole: "on the left of" is one mention of "left of", not also an "on"
    spans = [_mentions(r, text) for r in reqs]
    ok = [bool(s) for s in spans]
    consuming = sorted((i for i, r in enumerate(reqs) if r.consume and spans[i]), key=lambda i: len(spans[i]))
    search = _Assignment(spans, consuming, budget)
    search.dfs(0, [], set())
    for i in consuming:
        ok[i] = i in search.best
    return ok


class _Assignment:
    """The bounded backtracking search of :func:`_satisfied` (a class, not recursive closures: those
    would make a reference cycle per call)."""

    __slots__ = ("spans", "consuming", "budget", "steps", "best_n", "best")

    def __init__(self, spans: list[list[tuple[int, int]]], consuming: list[int], budget: int) -> None:
        self.spans = spans
        self.consuming = consuming
        self.budget = budget
        self.steps = 0
        self.best_n = -1
        self.best: set[int] = set()

    def dfs(self, j: int, used: list[tuple[int, int]], met: set[int]) -> None:
        self.steps += 1
        consuming = self.consuming
        if len(met) + (len(consuming) - j) <= self.best_n or self.steps > self.budget:
            return
        if j == len(consuming):
            self.best_n, self.best = len(met), set(met)
            return
        i = consuming[j]
        for span in self.spans[i]:
            if all(span[1] <= a or span[0] >= b for a, b in used):
                used.append(span)
                met.add(i)
                self.dfs(j + 1, used, met)
                met.discard(i)
                used.pop()
        self.dfs(j + 1, used, met)


def check_rewrite(query: Node, text: str, *, synonyms: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """What of the referring path ``query`` the text ``text`` no longer states (empty: nothing lost).

    Every node's category (the word, its plural or a :data:`CATEGORY_SYNONYMS` entry), every
    attribute (or an :data:`ATTRIBUTE_SYNONYMS` entry), every relation (its phrase or a
    :data:`RELATION_PARAPHRASES` entry) and every position must be mentioned, each by its own words
    (two "red" attributes need two mentions of red). Labels come in path order, once each.

    >>> q = Node("ball", ("red",), (("left of", Node("box")),))
    >>> check_rewrite(q, "the red ball on the left side of the box")
    []
    >>> check_rewrite(q, "the ball beside the box")
    ['red', 'left of']
    >>> check_rewrite(Node("ball", ("red",), (("next to", Node("box", ("red",))),)), "a red ball by a box")
    ['red']
    """
    syn = CATEGORY_SYNONYMS if synonyms is None else synonyms
    reqs = _requirements(query, syn)
    ok = _satisfied(reqs, _norm(text))
    missing: list[str] = []
    for r, good in zip(reqs, ok, strict=True):
        if not good and r.label not in missing:
            missing.append(r.label)
    return missing


_ATTRIBUTE_WORDS: dict[str, str] = {
    **{w: a for a, ws in ATTRIBUTE_SYNONYMS.items() for w in ws},
    **{a: a for a in ATTRIBUTE_FAMILY},
}
_ATTRIBUTE_WORD_RX = re.compile(r"(?<![a-z0-9])(" + "|".join(re.escape(_norm(w)) for w in
                                                              sorted(_ATTRIBUTE_WORDS, key=len, reverse=True))
                                + r")(?![a-z0-9])")


def rewrite_additions(query: Node, text: str) -> list[str]:
    """Lexicon attribute words in ``text`` that no node of ``query`` has (a rewrite must not add them).

    >>> rewrite_additions(Node("ball", ("red",)), "the big red ball")
    ['big']
    """
    have = {a for n in query.nodes() for a in n.attributes}
    out: list[str] = []
    for m in _ATTRIBUTE_WORD_RX.finditer(_norm(text)):
        word = m.group(1)
        attr = _ATTRIBUTE_WORDS.get(word) or _ATTRIBUTE_WORDS.get(word.replace(" ", ""))
        if attr is not None and attr not in have and word not in out:
            out.append(word)
    return out


# ========================================================================================== rewrite


class RewriteOut(pydantic.BaseModel):
    expression: str


@dataclass(frozen=True)
class RewriteItem:
    """One expression to rewrite: its sample, its (template-rendered) text and its referring path.

    For a text negative, ``query`` is the edited path and ``edit`` is ``(negative_type, detail)`` as
    :class:`~refforge.stages.negatives.NegativeCandidate` has them: the rewrite is then also checked
    with :func:`check_negative_rewrite` (the replaced word not restored, a swap not undone).
    """

    sample_id: str
    text: str
    query: Node
    edit: tuple[str, str] | None = None


_EDIT_RX = re.compile(r"^(?P<a>.+?)(?P<op><->|->)(?P<b>.+?) (?:on|between) ")
_EDIT_KIND = {"replace_attribute": "attribute", "swap_attribute": "attribute", "replace_object": "category",
              "swap_object": "category", "replace_relation": "relation"}


def _word_req(kind: str, word: str) -> _Req:
    if kind == "attribute":
        return _attribute_req(word)
    if kind == "relation":
        return _relation_req(word)
    return _category_req(word, CATEGORY_SYNONYMS)


def _mentions(req: _Req, text: str) -> list[tuple[int, int]]:
    """The maximal spans of ``text`` (normalised) that mention ``req``, in order."""
    found = {m.span() for rx in req.patterns for m in rx.finditer(text)}
    return sorted(s for s in found if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in found))


def check_negative_rewrite(negative_type: str, detail: str, template_text: str, text: str) -> str | None:
    """Why a rewrite of a text negative undoes its edit (None: it does not).

    ``detail`` is the negative's edit as ``text_negatives`` writes it (``"red->blue on node 1"``,
    ``"left of->right of on R1 (...)"``, ``"ball<->box between node 1 and node 2"``) and
    ``template_text`` the negative's own template text. :func:`check_rewrite` against the edited path
    already requires the new word; this adds what word presence cannot see:

    * replace: the original word (or a synonym/paraphrase) must not be mentioned more often than in
      the template text -> ``"rewrite restored: red"``;
    * swap: the two swapped words must come in the template's order -> ``"rewrite reordered swap: a, b"``
      (conservative: a rewrite that moves whole clauses around is refused too, and keeps the template).

    >>> check_negative_rewrite("replace_attribute", "red->blue on node 1", "the blue ball", "a blue ball, not red")
    'rewrite restored: red'
    >>> check_negative_rewrite("swap_attribute", "red<->blue between node 1 and node 2",
    ...                        "the blue ball next to the red box", "a red ball beside a blue box")
    'rewrite reordered swap: red, blue'
    """
    kind = _EDIT_KIND.get(negative_type)
    m = _EDIT_RX.match(detail or "")
    if kind is None or m is None:
        return None
    a, b = m.group("a").strip(), m.group("b").strip()
    tt, rt = _norm(template_text), _norm(text)
    if m.group("op") == "->":
        req = _word_req(kind, a)
        if len(_mentions(req, rt)) > len(_mentions(req, tt)):
            return f"rewrite restored: {a}"
        return None
    ra, rb = _word_req(kind, a), _word_req(kind, b)
    ta, tb, wa, wb = _mentions(ra, tt), _mentions(rb, tt), _mentions(ra, rt), _mentions(rb, rt)
    if not (ta and tb and wa and wb):
        return None  # a missing word is check_rewrite's finding
    if (ta[0][0] < tb[0][0]) != (wa[0][0] < wb[0][0]):
        return f"rewrite reordered swap: {a}, {b}"
    return None


@dataclass(frozen=True)
class RewriteOutcome:
    """``text`` is the rewrite when kept; ``drop`` is set (and ``text`` None) otherwise."""

    sample_id: str
    source_text: str
    text: str | None
    drop: Drop | None
    prompt_version: str
    model: str
    missing: tuple[str, ...] = ()
    cached: bool = False

    @property
    def kept(self) -> bool:
        return self.drop is None


REWRITE_STYLES: tuple[str, ...] = (
    "concise, as few words as possible",
    "casual and natural, the way people talk",
    "clear and precise, a little more descriptive in word order",
    "start with the most distinctive detail",
)


def _keep_list(query: Node, depth: int = 0, out: list[str] | None = None) -> list[str]:
    """What a rewrite must keep of ``query`` and its anchors, depth first, appended to ``out``."""
    if out is None:
        out = []
    who = "the target object" if depth == 0 else "another object"
    attrs = order_attributes(list(query.attributes))
    out.append(f"{who}: {query.category}" + (f" ({', '.join(attrs)})" if attrs else ""))
    if query.position is not None:
        out.append(f"the position of the {query.category}: {_position_label(query.position)}")
    for pred, child in query.relations:
        out.append(f"the relation: {query.category} {RELATIONS.get(pred, pred)} {child.category}")
        _keep_list(child, depth + 1, out)
    return out


def _clean_expression(text: str) -> str:
    t = " ".join(text.split()).strip().strip("\"'`\u201c\u201d").strip()
    return t[:-1].rstrip() if t.endswith(".") else t


def rewrite_expressions(
    client: LLMClient | None,
    items: Sequence[RewriteItem],
    *,
    seed: int = 0,
    temperature: float = 0.7,
    api_seed: bool = True,
    stage: str = "rewrite",
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> list[RewriteOutcome]:
    """Rewrite template expressions into natural language; one outcome per item, in order.

    A rewrite is kept when :func:`check_rewrite` finds nothing lost and :func:`rewrite_additions`
    nothing added; otherwise it is a drop with reason ``"rewrite lost: red, left of"`` or
    ``"rewrite added: big"`` (detail: the rewrite). An unusable answer is a drop with the client's
    reason ("refusal", "empty", "unparseable", "schema_mismatch", "truncated").

    ``seed`` picks each item's style (stable per sample) and is sent as the API's ``seed`` unless
    ``api_seed=False`` (for servers that reject it). ``client=None`` keeps every text unchanged
    (the offline default; ``model="template"``).
    """
    pv = prompt_version("rewrite")
    if client is None:
        return [RewriteOutcome(it.sample_id, it.text, it.text, None, pv, "template") for it in items]
    macros = _macros("rewrite")
    system = macros.system()
    reqs = []
    for it in items:
        style = REWRITE_STYLES[zlib.crc32(f"{seed}\x1f{it.sample_id}".encode()) % len(REWRITE_STYLES)]
        user = macros.user(it.text, _keep_list(it.query), style)
        reqs.append(ChatRequest(_messages(system, user), pv, stage, temperature, None, RewriteOut,
                                _extra(seed if api_seed else None)))
    results = client.run_many(reqs)
    out: list[RewriteOutcome] = []
    for it, res in zip(items, results, strict=True):
        if isinstance(res, LLMOutputError):
            out.append(RewriteOutcome(it.sample_id, it.text, None, _drop(stage, it.sample_id, res.reason, res.detail),
                                      pv, client.model, cached=res.cached))
            continue
        model = _model_of(res, client)
        text = _clean_expression(res.parsed.expression)  # type: ignore[union-attr]
        if not text:
            out.append(RewriteOutcome(it.sample_id, it.text, None, _drop(stage, it.sample_id, "empty",
                                                                         "the rewrite is empty"),
                                      pv, model, cached=res.cached))
            continue
        missing = check_rewrite(it.query, text, synonyms=synonyms)
        added = [] if missing else rewrite_additions(it.query, text)
        if missing or added:
            reason = f"rewrite lost: {', '.join(missing)}" if missing else f"rewrite added: {', '.join(added)}"
            out.append(RewriteOutcome(it.sample_id, it.text, None, _drop(stage, it.sample_id, reason, text), pv,
                                      model, tuple(missing or added), res.cached))
            continue
        undone = check_negative_rewrite(it.edit[0], it.edit[1], it.text, text) if it.edit else None
        if undone:
            out.append(RewriteOutcome(it.sample_id, it.text, None, _drop(stage, it.sample_id, undone, text), pv,
                                      model, cached=res.cached))
            continue
        out.append(RewriteOutcome(it.sample_id, it.text, text, None, pv, model, cached=res.cached))
    return out


# ================================================================================ negatives backend


class CandidatesOut(pydantic.BaseModel):
    candidates: list[str]


_KNOWN_CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys([*CATEGORIES, *NEGATIVE_CATEGORIES]))
_KNOWN_PREDICATES: tuple[str, ...] = tuple(dict.fromkeys(
    [*RELATIONS, *RELATION_ALTERNATIVES, *(p for alts in RELATION_ALTERNATIVES.values() for p in alts)]))
_PHRASE_TO_PREDICATE: dict[str, str] = {_norm(v): k for k, v in RELATIONS.items()} | {_norm(p): p
                                                                                       for p in _KNOWN_PREDICATES}
_TYPE_KIND = {"replace_attribute": "attribute", "replace_object": "category", "replace_relation": "relation"}


def _clean_word(word: str) -> str:
    w = " ".join(str(word).lower().replace("_", " ").split()).strip(" .,;:!\"'`")
    return re.sub(r"^(?:a|an|the) ", "", w)


class LLMNegativeBackend:
    """A :class:`~refforge.stages.negatives.NegativeBackend` that asks the model for replacements.

    One request per distinct ``(kind, word[, family])``: the prompt (``prompts/llm/negatives.j2``)
    depends on the word alone, never on the image, so a word costs one request per build (and none
    on a re-run with a :class:`~refforge.llm.ResponseCache`). Answers are memoised in the backend
    too. Call :meth:`prefetch` with a shard's queries first: it sends every missing request in one
    concurrent ``run_many``; the per-word Protocol calls that ``text_negatives`` makes then read
    the memo.

    Vocabulary (an LLM proposes synonyms and shades that the graph cannot refute, so proposals are
    restricted to words the graph's vocabulary can verify):

    * attributes: other values of the same lexicon family only;
    * relations: the lexicon's predicates only (phrases such as "to the left of" are mapped back);
    * categories: the lexicon's categories (``CATEGORIES`` and ``NEGATIVE_CATEGORIES``), or any word
      with ``open_categories=True`` (then always minus the word, its plural and its
      :data:`CATEGORY_SYNONYMS`); on incomplete graphs ``text_negatives`` flags replace_object
      candidates for review anyway.

    Per image: categories present in the image are removed (the driver does too) and, with
    ``prefer_present``, attribute values that occur in the image come first (harder negatives).

    A word whose answer is unusable becomes a drop in :attr:`drops` (stage ``negatives_text``, key
    ``"llm:<kind>:<word>"``) and is answered by ``fallback`` (default: no proposals).
    """

    def __init__(self, client: LLMClient, *, max_candidates: int = 8, open_categories: bool = False,
                 prefer_present: bool = True, fallback: NegativeBackend | None = None, temperature: float = 0,
                 stage: str = "negatives_text") -> None:
        self.client = client
        self.max_candidates = max_candidates
        self.open_categories = open_categories
        self.prefer_present = prefer_present
        self.fallback = fallback
        self.temperature = temperature
        self.stage = stage
        self.prompt_version = prompt_version("negatives")
        self.drops: list[Drop] = []
        self._memo: dict[tuple[str, str, str], list[str] | None] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LLMNegativeBackend(model={self.client.model!r}, open_categories={self.open_categories!r})"

    @property
    def model(self) -> str:
        return self.client.model

    def __getstate__(self) -> dict[str, Any]:  # picklable for Prefect/dask workers (the lock is not)
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- requests
    def _allowed(self, kind: str, word: str, family: str) -> list[str]:
        if kind == "attribute":
            return [v for v in ATTRIBUTE_FAMILIES.get(family, ()) if v != word]
        if kind == "relation":
            return [p for p in _KNOWN_PREDICATES if p != word]
        if self.open_categories:
            return []
        return sorted(c for c in _KNOWN_CATEGORIES if c != word)

    def _request(self, kind: str, word: str, family: str) -> ChatRequest:
        m = _macros("negatives")
        user = m.user(kind, word, family, RELATIONS.get(word, word), self._allowed(kind, word, family),
                      self.max_candidates)
        return ChatRequest(_messages(m.system(), user), self.prompt_version, self.stage, self.temperature, None,
                           CandidatesOut)

    def _accept(self, kind: str, word: str, family: str, raw: Iterable[str]) -> list[str]:
        out: list[str] = []
        banned = {word, plural(word), *CATEGORY_SYNONYMS.get(word, ())} if kind == "category" else {word}
        allowed = set(self._allowed(kind, word, family))
        for cand in raw:
            w = _clean_word(cand)
            if kind == "relation":
                w = _PHRASE_TO_PREDICATE.get(_norm(w), w)
            if not w or w in banned or w in out:
                continue
            if allowed and w not in allowed:
                continue
            if kind == "category" and not allowed and not re.fullmatch(r"[a-z][a-z \-]{0,40}", w):
                continue
            out.append(w)
        return out[: self.max_candidates]

    def _store(self, key: tuple[str, str, str], res: ChatResult | LLMOutputError) -> None:
        kind, word, family = key
        if isinstance(res, LLMOutputError):
            value = None
            drop = _drop(self.stage, f"llm:{kind}:{word}", f"llm {res.reason}", res.detail)
            with self._lock:
                self.drops.append(drop)
        else:
            value = self._accept(kind, word, family, res.parsed.candidates)  # type: ignore[union-attr]
        with self._lock:
            self._memo[key] = value

    def prefetch(self, items: Iterable[Any], types: Iterable[str] = NEGATIVE_TYPES) -> int:
        """Ask for every word the driver will need for these positives; returns the requests sent
        (words already memoised are skipped; a response cache may still answer the rest for free).

        ``items``: :class:`~refforge.stages.query.Node` queries, or objects with a ``query`` attribute.
        """
        kinds = {_TYPE_KIND[t] for t in types if t in _TYPE_KIND}
        keys: dict[tuple[str, str, str], None] = {}
        for item in items:
            query = item if isinstance(item, Node) else item.query
            for n in query.nodes():
                if "category" in kinds:
                    keys[("category", n.category, "")] = None
                if "attribute" in kinds:
                    for a in n.attributes:
                        fam = ATTRIBUTE_FAMILY.get(a)
                        if fam is not None:
                            keys[("attribute", a, fam)] = None
                if "relation" in kinds:
                    for pred, _child in n.relations:
                        keys[("relation", pred, "")] = None
        with self._lock:
            todo = [k for k in keys if k not in self._memo]
        if not todo:
            return 0
        results = self.client.run_many([self._request(*k) for k in todo])
        for k, res in zip(todo, results, strict=True):
            self._store(k, res)
        return len(todo)

    def _get(self, kind: str, word: str, family: str = "") -> list[str] | None:
        key = (kind, word, family)
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        res: ChatResult | LLMOutputError
        try:
            res = self.client.chat_sync(**_request_kwargs(self._request(kind, word, family)))
        except LLMOutputError as exc:
            res = exc
        self._store(key, res)
        return self._memo[key]

    def take_drops(self) -> list[Drop]:
        """The drops recorded so far, and forget them (call once per shard)."""
        with self._lock:
            out, self.drops = self.drops, []
        return out

    # -- the Protocol
    def replacements_for_attribute(self, value: str, family: str, context: ReplacementContext) -> list[str]:
        got = self._get("attribute", value, family)
        if got is None:
            return self.fallback.replacements_for_attribute(value, family, context) if self.fallback else []
        if self.prefer_present:
            present = context.image_attributes
            got = sorted(got, key=lambda v: v not in present)
        return list(got)

    def replacements_for_category(self, category: str, context: ReplacementContext) -> list[str]:
        got = self._get("category", category)
        if got is None:
            return self.fallback.replacements_for_category(category, context) if self.fallback else []
        return [c for c in got if c not in context.image_categories]

    def replacements_for_relation(self, predicate: str, context: ReplacementContext) -> list[str]:
        got = self._get("relation", predicate)
        if got is None:
            return self.fallback.replacements_for_relation(predicate, context) if self.fallback else []
        return list(got)


def _request_kwargs(req: ChatRequest) -> dict[str, Any]:
    return {"messages": req.messages, "prompt_version": req.prompt_version, "stage": req.stage,
            "temperature": req.temperature, "max_tokens": req.max_tokens, "response_schema": req.response_schema,
            "extra": req.extra, "sample": req.sample}


def negative_backend(client: LLMClient | None, **kwargs: Any) -> NegativeBackend:
    """The negatives backend for a client: :class:`LLMNegativeBackend`, or the offline
    :class:`~refforge.stages.negatives.LexiconBackend` when ``client`` is None."""
    return LexiconBackend() if client is None else LLMNegativeBackend(client, **kwargs)


# ================================================================================== answer parsing

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


def parse_answer(text: str, dialect: str = "pixels", *, width: float | None = None, height: float | None = None,
                 sent_size: tuple[float, float] | None = None) -> ParsedAnswer:
    """:func:`refforge.stages.cot.parse_answer` with the box read in the ``dialect`` that was asked for,
    returned in pixels of the stored ``width`` x ``height`` image.

    * ``"grid1000"``: the numbers are on the 0-1000 grid of the image (any notation:
      ``[..]``, ``(x1,y1),(x2,y2)``, ``{"bbox_2d": [..]}``) and are mapped with ``boxes.from_grid``;
    * ``"pixels"``, ``"pairs"``, ``"qwen_json"``: pixels of the image the model saw, ``sent_size``
      (default: the stored size), scaled to the stored size (``EncodedImage.to_original`` does the same).

    ``{"bbox_2d": null}`` and the rejections ``cot.parse_answer`` knows ("none", "null", "no object",
    an all-zero box) parse as kind "none". The box is clipped to the image; one with no area left is
    "unparseable".

    >>> parse_answer('<answer>[100, 100, 500, 500]</answer>', "grid1000", width=640, height=480).box
    (64.0, 48.0, 320.0, 240.0)
    >>> parse_answer('<answer>{"bbox_2d": null}</answer>', "qwen_json", width=640, height=480).kind
    'none'
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown box dialect {dialect!r}; expected one of {DIALECTS}")
    parsed = cot.parse_answer(text)  # its raw is the last <answer> element (or the text), stripped
    if _json_null_box(parsed.raw):
        return ParsedAnswer("none", raw=parsed.raw)
    if parsed.kind != "box" or parsed.box is None:
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
        return ParsedAnswer("unparseable", raw=parsed.raw, reason=f"degenerate box {list(parsed.box)}")
    return ParsedAnswer("box", box=tuple(float(v) for v in box), raw=parsed.raw)  # type: ignore[arg-type]


# ========================================================================================= grounding


class VLMGrounder:
    """``grounder(image, text) -> box | None``: a VLM grounding call through the client.

    Asks (``prompts/llm/ground.j2``) for ``{"bbox_2d": [x1, y1, x2, y2]}`` in the sent image's pixels
    (``dialect="pixels"``) or on the 0-1000 grid (``"grid1000"``), parses it with :func:`parse_answer`
    and maps it back to the pixels of ``image`` (``EncodedImage.to_original``). None when the model
    finds nothing or answers something without a box. An unusable answer raises
    :class:`~refforge.llm.LLMOutputError` from ``__call__``; :meth:`ground_many` returns it in place.
    """

    def __init__(self, client: LLMClient, *, dialect: Literal["pixels", "grid1000"] = "pixels",
                 stage: str = "ground") -> None:
        if dialect not in ("pixels", "grid1000"):
            raise ValueError("dialect must be 'pixels' or 'grid1000'")
        self.client = client
        self.dialect = dialect
        self.stage = stage
        self.prompt_version = prompt_version("ground")

    def __repr__(self) -> str:
        return f"VLMGrounder(model={self.client.model!r}, dialect={self.dialect!r})"

    def _request(self, enc, text: str) -> ChatRequest:
        m = _macros("ground")
        user = [enc.part, {"type": "text", "text": m.user(text, self.dialect, enc.width, enc.height).strip()}]
        return ChatRequest(_messages(m.system(), user), self.prompt_version, self.stage, 0)

    def _box(self, enc, res: ChatResult) -> Box | None:
        p = parse_answer(res.text, self.dialect, width=enc.original_width, height=enc.original_height,
                         sent_size=(enc.width, enc.height))
        return p.box if p.kind == "box" else None

    def ground_many(self, image: Any, texts: Sequence[str]) -> list[Box | None | LLMOutputError]:
        enc = self.client.encode_image(image)
        results = self.client.run_many([self._request(enc, t) for t in texts])
        return [r if isinstance(r, LLMOutputError) else self._box(enc, r) for r in results]

    def __call__(self, image: Any, text: str) -> Box | None:
        res = self.ground_many(image, [text])[0]
        if isinstance(res, LLMOutputError):
            raise res
        return res


def vlm_grounder(client: LLMClient, *, dialect: Literal["pixels", "grid1000"] = "pixels",
                 stage: str = "ground") -> VLMGrounder:
    """A :class:`VLMGrounder` over ``client`` (the round-trip grounder of :func:`describe_boxes`)."""
    return VLMGrounder(client, dialect=dialect, stage=stage)


# ========================================================================================== describe


class Description(pydantic.BaseModel):
    category: str
    text: str


class DescribeOut(pydantic.BaseModel):
    descriptions: list[Description]


@dataclass(frozen=True)
class DescribeOutcome:
    """One (box, task category): ``text`` when kept, else ``drop``. Boxes in stored-image pixels."""

    box_id: str
    category: str
    box: Box
    text: str | None
    drop: Drop | None
    prompt_version: str
    model: str
    grounded_box: Box | None = None
    iou: float | None = None
    ground_version: str | None = None  # the grounder's prompt_version, when it has one

    @property
    def kept(self) -> bool:
        return self.drop is None


MARK_COLOUR: tuple[int, int, int] = (255, 0, 255)
_COLOUR_NAMES = {(255, 0, 255): "magenta", (255, 0, 0): "red", (0, 255, 0): "green", (0, 0, 255): "blue",
                 (255, 255, 0): "yellow", (0, 255, 255): "cyan"}


def draw_mark(image: Any, box: Sequence[float], label: str | int, *, colour: tuple[int, int, int] = MARK_COLOUR,
              line_width: int | None = None):
    """A copy of ``image`` (RGB) with ``box`` (pixels of ``image``) outlined in ``colour`` and ``label``
    written on a tag at its top-left corner (Set-of-Mark). The outline covers the box's edge pixels
    and ``line_width - 1`` pixels inward."""
    from PIL import ImageDraw, ImageFont

    img = image.convert("RGB").copy()
    w, h = img.size
    x1, y1, x2, y2 = (float(v) for v in box)
    lw = line_width or max(2, round(min(w, h) / 160))
    draw = ImageDraw.Draw(img)
    draw.rectangle([round(x1), round(y1), max(round(x1), round(x2) - 1), max(round(y1), round(y2) - 1)],
                   outline=colour, width=lw)
    size = max(10, round(min(w, h) / 25))
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font
        font = ImageFont.load_default()
    text = str(label)
    left, t, r, b = draw.textbbox((0, 0), text, font=font)
    tw, th = r - left + 2 * lw, b - t + 2 * lw
    tx = min(max(0, round(x1)), max(0, w - tw))
    ty = round(y1) - th if round(y1) - th >= 0 else round(y1)
    draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=colour)
    brightness = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((tx + lw - left, ty + lw - t), text, fill=(0, 0, 0) if brightness > 160 else (255, 255, 255), font=font)
    return img


def _crop(image: Any, box: Sequence[float], pad: float = 0.1, min_side: int = 224):
    from PIL import Image

    w, h = image.size
    x1, y1, x2, y2 = (float(v) for v in box)
    px, py = max(4.0, (x2 - x1) * pad), max(4.0, (y2 - y1) * pad)
    c = image.crop((max(0, int(x1 - px)), max(0, int(y1 - py)), min(w, int(x2 + px + 0.999)),
                    min(h, int(y2 + py + 0.999))))
    if max(c.size) < min_side:
        s = min_side / max(c.size)
        c = c.resize((max(1, round(c.width * s)), max(1, round(c.height * s))), Image.Resampling.LANCZOS)
    return c


def _image_format(image: Any) -> Literal["png", "jpeg"]:
    return "jpeg" if (getattr(image, "format", None) or "").upper() == "JPEG" else "png"


def _as_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, bytes | bytearray | memoryview):
        img = Image.open(io.BytesIO(bytes(image)))
    else:
        img = Image.open(image)
    img.load()
    return img


def describe_boxes(
    client: LLMClient,
    image: Any,
    boxes: Sequence[tuple[str, Sequence[float]]],
    categories: Sequence[str],
    *,
    width: int,
    height: int,
    grounder: Callable[[Any, str], Sequence[float] | None],
    iou_threshold: float = 0.5,
    mark_colour: tuple[int, int, int] = MARK_COLOUR,
    temperature: float = 0,
    batch_size: int = 16,
    stage: str = "describe",
) -> list[DescribeOutcome]:
    """One unique description per ``(box, category)`` for proposal boxes, round-trip checked.

    For each box the VLM sees the image with the box outlined and numbered (Set-of-Mark, in
    ``mark_colour``) and a crop of it, and answers ``{"descriptions": [{"category", "text"}]}``
    (``prompts/llm/describe.j2``). Each description is grounded again with ``grounder(image, text)``
    (a :class:`VLMGrounder`, or any callable returning a box in pixels of ``image`` or None; an
    object with ``ground_many(image, texts)`` is called once per batch) and kept only when the box
    it finds has IoU >= ``iou_threshold`` with the proposal.

    ``boxes``: ``(box_id, (x1, y1, x2, y2))`` in pixels of the stored ``width`` x ``height`` image
    (``image`` may be that image at another size). Returns ``len(boxes) * len(categories)`` outcomes,
    box by box in the order of ``categories``. Drop reasons: the client's ("refusal", ...), "no
    description" (the category is missing from the answer or empty), "round trip found nothing",
    "round trip IoU 0.31 < 0.5", "round trip <client reason>", "bad proposal box". Drop keys:
    ``"<box_id>/<category>"``.
    """
    if client is None:
        raise ValueError("describe needs a VLM client: there is no offline describe backend")
    if not categories:
        return []
    pil = _as_pil(image)
    sx, sy = pil.width / width, pil.height / height
    fmt = _image_format(pil)
    pv = prompt_version("describe")
    macros = _macros("describe")
    system = macros.system()
    colour_name = _COLOUR_NAMES.get(tuple(mark_colour), f"rgb{tuple(mark_colour)}")
    gv = getattr(grounder, "prompt_version", None)
    out: list[DescribeOutcome] = []

    def drop_all(box_id: str, box: Box, reason: str, detail: str | None, model: str) -> None:
        for c in categories:
            out.append(DescribeOutcome(box_id, c, box, None, _drop(stage, f"{box_id}/{c}", reason, detail), pv, model))

    for start in range(0, len(boxes), max(1, batch_size)):
        chunk = boxes[start:start + max(1, batch_size)]
        reqs: list[ChatRequest] = []
        valid: list[tuple[int, str, Box]] = []
        for j, (box_id, raw_box) in enumerate(chunk):
            box = tuple(float(v) for v in raw_box)
            if not (len(box) == 4 and 0 <= box[0] < box[2] <= width + 1e-6 and 0 <= box[1] < box[3] <= height + 1e-6):
                drop_all(box_id, box, "bad proposal box", f"{list(box)} in a {width}x{height} image", client.model)
                continue
            img_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            mark = start + j + 1
            marked = client.encode_image(draw_mark(pil, img_box, mark, colour=mark_colour), fmt=fmt)
            crop = client.encode_image(_crop(pil, img_box), fmt=fmt)
            user = [{"type": "text", "text": macros.user(mark, colour_name, list(categories), marked.width,
                                                         marked.height).strip()},
                    marked.part,
                    {"type": "text", "text": macros.crop_caption().strip()},
                    crop.part]
            reqs.append(ChatRequest(_messages(system, user), pv, stage, temperature, None, DescribeOut))
            valid.append((len(out), box_id, box))  # placeholder position
            out.extend([None] * len(categories))  # type: ignore[list-item]
        if not reqs:
            continue
        results = client.run_many(reqs)
        # (slot in out, box_id, box, category, text, model) of every description to ground
        pending: list[tuple[int, str, Box, str, str, str]] = []
        for (slot, box_id, box), res in zip(valid, results, strict=True):
            if isinstance(res, LLMOutputError):
                for k, c in enumerate(categories):
                    out[slot + k] = DescribeOutcome(box_id, c, box, None,
                                                    _drop(stage, f"{box_id}/{c}", res.reason, res.detail), pv,
                                                    client.model)
                continue
            model = _model_of(res, client)
            by_cat: dict[str, str] = {}
            for d in res.parsed.descriptions:  # type: ignore[union-attr]
                key = d.category.strip().lower()
                text = _clean_expression(d.text)
                if text and key not in by_cat:
                    by_cat[key] = text
            for k, c in enumerate(categories):
                text = by_cat.get(c.strip().lower())
                if not text:
                    out[slot + k] = DescribeOutcome(box_id, c, box, None,
                                                    _drop(stage, f"{box_id}/{c}", "no description",
                                                          f"the answer has no {c!r} description"), pv, model)
                else:
                    pending.append((slot + k, box_id, box, c, text, model))
        if not pending:
            continue
        texts = [p[4] for p in pending]
        if hasattr(grounder, "ground_many"):
            found = grounder.ground_many(pil, texts)  # type: ignore[union-attr]
        else:
            found = []
            for t in texts:
                try:
                    found.append(grounder(pil, t))
                except LLMOutputError as exc:
                    found.append(exc)
        for (slot, box_id, box, c, text, model), got in zip(pending, found, strict=True):
            key = f"{box_id}/{c}"
            if isinstance(got, LLMOutputError):
                out[slot] = DescribeOutcome(box_id, c, box, None, _drop(stage, key, f"round trip {got.reason}",
                                                                        got.detail), pv, model, ground_version=gv)
                continue
            if got is None:
                out[slot] = DescribeOutcome(box_id, c, box, None, _drop(stage, key, "round trip found nothing", text),
                                            pv, model, ground_version=gv)
                continue
            gb = tuple(float(v) for v in got)
            gb = (gb[0] / sx, gb[1] / sy, gb[2] / sx, gb[3] / sy)
            score = iou(gb, box)
            if score < iou_threshold:
                out[slot] = DescribeOutcome(box_id, c, box, None,
                                            _drop(stage, key, f"round trip IoU {score:.2f} < {iou_threshold:g}",
                                                  text), pv, model, gb, score, gv)
            else:
                out[slot] = DescribeOutcome(box_id, c, box, text, None, pv, model, gb, score, gv)
    return out


# =============================================================================================== cot


class JudgeOut(pydantic.BaseModel):
    best: int
    reason: str


@dataclass(frozen=True)
class CotSample:
    """A sample to write traces for. ``gt_box`` in pixels of the stored ``width`` x ``height`` image
    (None for a negative); ``image`` a PIL image, encoded bytes or a path (any size).

    ``graph``/``query``/``target_id`` are needed only for the offline path (``client=None``).
    """

    sample_id: str
    text: str
    polarity: Literal["positive", "negative"]
    gt_box: Box | None
    image: Any
    width: int
    height: int
    graph: Any = None
    query: Node | None = None
    target_id: str | None = None


@dataclass
class LLMTrace(Trace):
    """A :class:`~refforge.stages.cot.Trace` from a model: the dialect it answered in, which of the K
    samples it is, the prompt version, and the judge's reason when the judge selected it."""

    dialect: str = "pixels"
    sample: int = 0
    prompt_version: str = ""
    judge_reason: str | None = None
    parse_reason: str | None = None
    cached: bool = False


class CotCandidates(list):
    """The candidate traces of one sample (a list of :class:`LLMTrace`), at most one ``selected``,
    with the sample's ``drops`` (candidates that ended in an unusable answer or repeated another,
    the judge's failures) and how the best was chosen (``selection``: "rule", "llm" or "none")."""

    def __init__(self, sample_id: str, traces: Iterable[Trace] = (), drops: Iterable[Drop] = (),
                 selection: str = "none") -> None:
        super().__init__(traces)
        self.sample_id = sample_id
        self.drops: list[Drop] = list(drops)
        self.selection = selection
        self.judge_prompt_version: str | None = None  # set when the LLM judge was asked


_CORRECT = ("correct", "correct_rejection")
_RULE_RANK = {v: i for i, v in enumerate(("correct", "correct_rejection", "wrong_box", "false_rejection",
                                          "false_positive", "unparseable"))}


def _rule_key(t: Trace, i: int) -> tuple:
    return (_RULE_RANK.get(t.verdict, len(_RULE_RANK)), -(t.iou or 0.0), len(t.text), i)


def _select(traces: list[Trace], best: int | None) -> None:
    if best is None and traces:
        best = min(range(len(traces)), key=lambda i: _rule_key(traces[i], i))
    for i, t in enumerate(traces):
        t.selected = i == best


def _hint(sample: CotSample, dialect: str, enc) -> str:
    if dialect == "grid1000":
        return format_box(sample.gt_box, "grid1000", width=sample.width, height=sample.height)
    sx, sy = enc.width / sample.width, enc.height / sample.height
    b = sample.gt_box
    return format_box((b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy), dialect)  # type: ignore[index]


def _answer_text(sample: CotSample, dialect: str, enc) -> str:
    if sample.polarity == "negative":
        return "none (there is no such object)"
    return _hint(sample, dialect, enc) + (" on the 0-1000 grid" if dialect == "grid1000" else " in pixels")


def llm_traces(
    client: LLMClient | None,
    samples: Sequence[CotSample],
    *,
    k: int = 3,
    judge: Literal["rule", "llm"] = "rule",
    dialect: str | Sequence[str] = "pixels",
    temperature: float = 0.8,
    seed: int | None = 0,
    iou_threshold: float = 0.5,
    judge_client: LLMClient | None = None,
    stage: str = "cot",
) -> list[CotCandidates]:
    """K hinted reasoning traces per sample, verified against the ground truth, the best selected.

    Candidate ``i`` of a sample is asked (``prompts/llm/cot.j2``) with the ground truth as a hint in
    the manner of UniVG-R1 ("the answer is [x1, y1, x2, y2]; explain step by step how to find it";
    "there is no such object" for a negative), for ``<think>..</think><answer>..</answer>`` in
    ``dialect`` (one of ``boxes.DIALECTS``; a sequence assigns dialects to candidates in turn), at
    ``temperature`` with API seed ``seed + i`` (``seed=None`` sends none; the cache keeps the K
    answers apart either way). Each answer is parsed in its dialect (:func:`parse_answer`; boxes in
    stored pixels) and verified with :func:`refforge.stages.cot.verify`: an answer without a usable
    box or rejection is kept with verdict "unparseable".

    Selection: ``judge="rule"``: verdict (correct first), then IoU, then the shorter text.
    ``judge="llm"``: when two or more candidates are verified correct, ``judge_client`` (default
    ``client``) sees only those and picks one (``{"best": int, "reason": str}``); an unusable or
    out-of-range verdict falls back to the rule (and adds a drop). The judge never sees, and so
    never selects, a wrong candidate.

    Returns one :class:`CotCandidates` per sample (a list of :class:`LLMTrace`, ``model`` = the
    model that answered) with its drops: candidates whose answer was unusable (the client's
    reason, key ``"<sample_id>/<i>"``) and exact repeats of an earlier candidate ("duplicate trace").

    ``client=None``: the offline graph walk (:func:`refforge.stages.cot.traces_for_sample`), which
    needs each sample's ``graph``, ``query`` and ``target_id``.
    """
    if judge not in ("rule", "llm"):
        raise ValueError(f"judge must be 'rule' or 'llm', not {judge!r}")
    dialects = [dialect] if isinstance(dialect, str) else list(dialect)
    for d in dialects:
        if d not in DIALECTS:
            raise ValueError(f"unknown box dialect {d!r}; expected one of {DIALECTS}")
    if client is None:
        out = []
        for s in samples:
            if s.graph is None or s.query is None:
                raise ValueError(f"sample {s.sample_id}: the offline cot backend needs its graph and query")
            ts = cot.traces_for_sample(s.graph, s.query, s.polarity, s.target_id, s.gt_box, k=k,
                                       iou_threshold=iou_threshold)
            out.append(CotCandidates(s.sample_id, ts, selection="rule"))
        return out

    pv = prompt_version("cot")
    macros = _macros("cot")
    system = macros.system()
    reqs: list[ChatRequest] = []
    plan: list[tuple[int, int, str]] = []  # (sample index, candidate, dialect)
    encoded = []
    for si, s in enumerate(samples):
        if s.polarity == "positive" and s.gt_box is None:
            raise ValueError(f"sample {s.sample_id}: a positive sample needs its gt_box")
        enc = client.encode_image(s.image)
        encoded.append(enc)
        for i in range(k):
            d = dialects[i % len(dialects)]
            hint = _hint(s, d, enc) if s.polarity == "positive" else ""
            user = [enc.part, {"type": "text", "text": macros.user(s.text, hint, s.polarity == "negative", d,
                                                                   enc.width, enc.height).strip()}]
            reqs.append(ChatRequest(_messages(system, user), pv, stage, temperature, None, None,
                                    _extra(None if seed is None else seed + i), i))
            plan.append((si, i, d))
    results = client.run_many(reqs)

    out = [CotCandidates(s.sample_id) for s in samples]
    seen: list[set[str]] = [set() for _ in samples]
    for (si, i, d), res in zip(plan, results, strict=True):
        s, enc = samples[si], encoded[si]
        key = f"{s.sample_id}/{i}"
        if isinstance(res, LLMOutputError):
            out[si].drops.append(_drop(stage, key, res.reason, res.detail))
            continue
        text = res.text.strip()
        if text in seen[si]:
            out[si].drops.append(_drop(stage, key, "duplicate trace", "the same text as an earlier candidate"))
            continue
        seen[si].add(text)
        parsed = parse_answer(text, d, width=s.width, height=s.height, sent_size=(enc.width, enc.height))
        verdict, score = cot.verify(parsed, s.polarity, s.gt_box, iou_threshold)
        out[si].append(LLMTrace(text=text, answer_box=parsed.box, verdict=verdict, iou=score,
                                model=_model_of(res, client), dialect=d, sample=i, prompt_version=pv,
                                parse_reason=parsed.reason, cached=res.cached))

    judged: dict[int, list[int]] = {}
    if judge == "llm":
        judge_client = judge_client or client
        jm = _macros("judge")
        jpv = prompt_version("judge")
        jreqs = []
        for si, cands in enumerate(out):
            good = [j for j, t in enumerate(cands) if t.verdict in _CORRECT]
            if len(good) >= 2:
                s = samples[si]
                user = jm.user(s.text, _answer_text(s, cands[good[0]].dialect, encoded[si]),
                               [cands[j].text for j in good])
                jreqs.append(ChatRequest(_messages(jm.system(), user), jpv, f"{stage}_judge", 0, None, JudgeOut))
                judged[si] = good
                cands.judge_prompt_version = jpv
        jres = judge_client.run_many(jreqs) if jreqs else []
        for (si, good), res in zip(judged.items(), jres, strict=True):
            cands = out[si]
            key = f"{cands.sample_id}/judge"
            if isinstance(res, LLMOutputError):
                cands.drops.append(_drop(stage, key, f"judge {res.reason}", res.detail))
                _select(cands, None)
                cands.selection = "rule"
                continue
            best = res.parsed.best  # type: ignore[union-attr]
            if not 0 <= best < len(good):
                cands.drops.append(_drop(stage, key, "judge chose no verified candidate",
                                         f"best={best}, {len(good)} candidates shown"))
                _select(cands, None)
                cands.selection = "rule"
                continue
            chosen = good[best]
            _select(cands, chosen)
            cands[chosen].judge_reason = res.parsed.reason  # type: ignore[union-attr]
            cands.selection = "llm"
    for si, cands in enumerate(out):
        if si not in judged and cands:
            _select(cands, None)
            cands.selection = "rule"
    return out
