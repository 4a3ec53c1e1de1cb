"""rewrite: template expressions -> natural language by an LLM, checked against each expression's path.

Not a stage of its own: the stages that write expressions (paths for positives, negatives_text for
the candidates, before refinement, so the blind-text classifier sees one style on both sides) call
:func:`rewrite_rows` on their rows, and declare the ``[rewrite]`` section in ``uses`` and
``hash_depends``. A kept rewrite replaces ``text``; a rejected one leaves the template text and
becomes a drop (stage "rewrite", the reason). ``template_text`` always keeps the template.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from pydantic import Field

from refforge._strict import _Strict
from refforge.llm import ChatRequest, LLMClient, LLMOutputError
from refforge.llm.endpoint import require_endpoint
from refforge.schemas import Drop, Expression
from refforge.stages.llm_common import _drop, _extra, _macros, _messages, _model_of, prompt_version
from refforge.stages.scene.lexicon import (
    ATTRIBUTE_FAMILY,
    RELATIONS,
    order_attributes,
    plural,
)
from refforge.stages.scene.query import Node, Position

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
    nothing added; otherwise it is a drop with reason ``"rewrite_lost"`` (detail ``"red, left of: <text>"``) or
    ``"rewrite_added"`` (detail ``"big: <text>"``). An unusable answer is a drop with the client's
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
            reason, words = ("rewrite lost", missing) if missing else ("rewrite added", added)
            out.append(RewriteOutcome(it.sample_id, it.text, None,
                                      _drop(stage, it.sample_id, reason, f"{', '.join(words)}: {text}"), pv,
                                      model, tuple(missing or added), res.cached))
            continue
        undone = check_negative_rewrite(it.edit[0], it.edit[1], it.text, text) if it.edit else None
        if undone:
            kind, _, words = undone.partition(": ")
            out.append(RewriteOutcome(it.sample_id, it.text, None,
                                      _drop(stage, it.sample_id, kind, f"{words}: {text}"), pv,
                                      model, cached=res.cached))
            continue
        out.append(RewriteOutcome(it.sample_id, it.text, text, None, pv, model, cached=res.cached))
    return out


# ======================================================================================== the step


class RewriteConfig(_Strict):
    """Template expressions -> natural language by an LLM (``[llm]``), checked against each expression's
    own path; ``offline`` keeps the template text."""

    backend: Literal["offline", "llm"] = "offline"
    temperature: float = Field(default=0.7, ge=0)

    def in_data(self) -> bool:
        """Whether the section changes the data (an offline rewrite is no rewrite: left out of the hash)."""
        return self.backend != "offline"

    def check_against(self, cfg: Any) -> None:
        if self.backend == "llm":
            require_endpoint(cfg, "llm", "rewrite.backend = 'llm'")


def rewrite_hash_part(data: dict[str, Any]) -> dict[str, Any]:
    """The ``[rewrite]`` section and the ``[llm]`` model in a writing stage's hash (when not offline)."""
    return {"rewrite": {**data["rewrite"], "llm": data.get("llm")}} if "rewrite" in data else {}


def rewrite_model(ctx) -> str:
    """The rewrite's model id for the run file ("template" when offline)."""
    llm = ctx.endpoint("llm")
    return llm.model if ctx.section("rewrite").backend == "llm" and llm else "template"


def rewrite_prompts(ctx) -> tuple[str, ...]:
    return ("rewrite",) if ctx.section("rewrite").backend == "llm" else ()


def rewrite_rows(ctx, rows: list[Expression], queries: list[Node],
                 edits: list[tuple[str, str] | None] | None = None) -> tuple[list[Expression], list[Drop]]:
    """Each row's template text rewritten by the LLM and checked against the row's own path
    (``queries``; for a text negative its edited path and ``edits``). Offline: rows unchanged."""
    section: RewriteConfig = ctx.section("rewrite")
    if section.backend == "offline" or not rows:
        return rows, []
    edits = edits or [None] * len(rows)
    items = [RewriteItem(r.sample_id, r.text, q, e) for r, q, e in zip(rows, queries, edits, strict=True)]
    outcomes = rewrite_expressions(ctx.client("llm"), items, seed=ctx.seed, temperature=section.temperature)
    out, drops = [], []
    for row, o in zip(rows, outcomes, strict=True):
        if o.kept and o.text != row.text:
            row = row.model_copy(update={"text": o.text})
        elif o.drop is not None:
            drops.append(o.drop)
        out.append(row)
    return out, drops


__all__ = ["RewriteConfig", "rewrite_hash_part", "rewrite_model", "rewrite_prompts", "rewrite_rows"]
