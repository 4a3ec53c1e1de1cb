"""The ``vlm`` backend of cot: K hinted traces per sample from the VLM, each read in the dialect asked
for and verified against the ground truth; the best selected by rule or by an LLM judge."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from refforge.llm import ChatRequest, LLMClient, LLMOutputError
from refforge.schemas import Drop
from refforge.stages.answers import parse_answer, verify
from refforge.stages.llm_common import Box, _drop, _extra, _macros, _messages, _model_of, prompt_version
from refforge.stages.scene.boxes import DIALECTS, format_box
from refforge.stages.scene.query import Node

from .walk import Trace, traces_for_sample

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
    """A :class:`~refforge.stages.cot.walk.Trace` from a model: the dialect it answered in, which of the K
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
# the verdicts of an answer that was read and checked against the ground truth, best first; any other
# verdict ("unparseable": no box and no rejection could be read) is never selected
USABLE_VERDICTS = ("correct", "correct_rejection", "wrong_box", "false_rejection", "false_positive")
_RULE_RANK = {v: i for i, v in enumerate(USABLE_VERDICTS)}
NO_USABLE_TRACE = "no usable trace"


def _rule_key(t: Trace, i: int) -> tuple:
    return (_RULE_RANK[t.verdict], -(t.iou or 0.0), len(t.text), i)


def _select(traces: list[Trace], best: int | None) -> None:
    """Mark trace ``best`` selected, or (None) the best usable one by the rule: none when no trace is usable."""
    if best is None:
        usable = [i for i, t in enumerate(traces) if t.verdict in _RULE_RANK]
        best = min(usable, key=lambda i: _rule_key(traces[i], i)) if usable else None
    for i, t in enumerate(traces):
        t.selected = i == best


def _no_usable_trace(stage: str, cands: CotCandidates, k: int) -> Drop:
    """The drop of a sample none of whose ``k`` candidates is usable, each candidate's outcome in the detail."""
    outcomes: dict[int, str] = {}
    for t in cands:
        outcomes[t.sample] = f"{t.verdict} ({t.parse_reason})" if t.parse_reason else t.verdict
    prefix = f"{cands.sample_id}/"
    for d in cands.drops:
        i = d.key.removeprefix(prefix)
        if i.isdigit():
            outcomes.setdefault(int(i), d.reason)
    detail = ", ".join(f"{i}: {outcomes.get(i, 'no answer')}" for i in range(k))
    return _drop(stage, cands.sample_id, NO_USABLE_TRACE, f"{k} candidate(s): {detail}")


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
    answers apart either way). Each answer is parsed in its dialect
    (:func:`refforge.stages.answers.parse_answer`; boxes in stored pixels) and verified with
    :func:`refforge.stages.answers.verify`: an answer without a usable
    box or rejection is kept with verdict "unparseable", and is never selected.

    Selection: ``judge="rule"``: verdict (correct first), then IoU, then the shorter text, among the
    candidates with a usable verdict (:data:`USABLE_VERDICTS`). A sample with none (every answer
    unparseable or unusable) has no selected trace, ``selection`` "none", and a drop
    (reason "no usable trace", key ``sample_id``, each candidate's outcome in the detail), so that
    nothing unusable reaches an export.
    ``judge="llm"``: when two or more candidates are verified correct, ``judge_client`` (default
    ``client``) sees only those and picks one (``{"best": int, "reason": str}``); an unusable or
    out-of-range verdict falls back to the rule (and adds a drop). The judge never sees, and so
    never selects, a wrong candidate.

    Returns one :class:`CotCandidates` per sample (a list of :class:`LLMTrace`, ``model`` = the
    model that answered) with its drops: candidates whose answer was unusable (the client's
    reason, key ``"<sample_id>/<i>"``), exact repeats of an earlier candidate ("duplicate trace") and,
    when no candidate is usable, the sample's own drop ("no usable trace").

    ``client=None``: the offline graph walk (:func:`refforge.stages.cot.walk.traces_for_sample`), which
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
            ts = traces_for_sample(s.graph, s.query, s.polarity, s.target_id, s.gt_box, k=k,
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
        parsed = parse_answer(text, dialect=d, width=s.width, height=s.height, sent_size=(enc.width, enc.height))
        verdict, score = verify(parsed, s.polarity, s.gt_box, iou_threshold)
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
        if si not in judged:
            _select(cands, None)
            cands.selection = "rule" if any(t.selected for t in cands) else "none"
        if not any(t.selected for t in cands):  # every candidate unusable: the sample has no trace
            cands.drops.append(_no_usable_trace(stage, cands, k))
    return out

