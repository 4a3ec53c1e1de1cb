"""`refforge eval` logic: prompts per answer dialect, robust answer parsing, scoring, metric tables.

Pure functions only; the run (client, images, files) is :mod:`refforge.flows.evaluate`.

Dialects (:data:`EVAL_DIALECTS`, templates ``prompts/eval/*.j2``):

* ``groundingme``  -- GroundingME style: one box ``[x1, y1, x2, y2]`` or "no such object".
* ``refbench-pro`` -- RefBench-PRO style: brief reasoning, then ``<answer>[x1, y1, x2, y2]</answer>``
  or ``<answer>[]</answer>`` when nothing matches.
* ``qwen-json``    -- Qwen2.5-VL grounding JSON, ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`` in
  absolute pixels of the image the model saw; ``[]`` = not present.

The first two also take ``coords="grid1000"`` (0-1000 grid, Qwen2-VL / InternVL style); Qwen JSON is
always pixels. Every prediction stores ``prompt_version = "eval/<dialect>.j2@<sha256 of the template>"``.

Parsing: :func:`refforge.stages.answers.parse_answer` with ``lenient=True`` accepts every dialect
whatever was asked, because models drift (JSON detections, fenced code, bbox keys, plain boxes,
rejection phrases, refusals: see :mod:`refforge.stages.answers`). Its :class:`~refforge.stages.answers.Answer`
carries the status, the box in the coordinates the model answered in (see :func:`map_box`), the
failure's reason and a note ("3 boxes in the answer; took the first").

Statuses (:data:`STATUSES`): ``box`` and ``rejection`` are answers; ``unparseable``, ``invalid_box``
(zero area, or nothing left inside the image), ``refusal``, ``empty``, ``truncated`` (the client's
output errors), ``request_error`` (the request failed) and ``missing`` (no prediction for the sample,
``--predictions``) are failures: they are **wrong on positives and on negatives** (a failure is not a
rejection). In the metric records a failure carries :data:`FAILED_BOX`, a box that is not a
rejection and overlaps nothing.

Scores for AUROC / AUPR / FPR95 / Recall@k (:func:`score_for`): with token logprobs, the model's
confidence ``c = exp(mean token logprob)`` of its answer gives ``c`` for a box and ``1 - c`` for a
rejection (the probability that an object is there); without them a binary score: 1 for a box, 0 for
anything else. ``score_source`` says which, per prediction and in metrics.json.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from refforge.stages.answers import Answer, as_box, finite_number
from refforge.stages.metrics import METRIC_COLUMNS, metric_table, paired_iou
from refforge.stages.scene.boxes import clip_boxes, from_grid
from refforge.stages.scene.templates import load_template, template_hash

__all__ = [
    "ANSWER_STATUSES",
    "COORDS",
    "EVAL_DIALECTS",
    "FAILED_BOX",
    "PROMPTS",
    "STATUSES",
    "build_messages",
    "check_dialect",
    "check_records",
    "evaluation_records",
    "map_box",
    "metrics_markdown",
    "prediction_record",
    "prompt_hash",
    "prompt_version",
    "score_for",
    "score_from_logprobs",
    "summarise",
]

Box = tuple[float, float, float, float]
EvalDialect = Literal["groundingme", "refbench-pro", "qwen-json"]
EVAL_DIALECTS: tuple[str, ...] = ("groundingme", "refbench-pro", "qwen-json")
COORDS: tuple[str, ...] = ("pixels", "grid1000")
PROMPTS: dict[str, str] = {
    "groundingme": "eval/groundingme.j2",
    "refbench-pro": "eval/refbench_pro.j2",
    "qwen-json": "eval/qwen_json.j2",
}
ANSWER_STATUSES: tuple[str, ...] = ("box", "rejection")
STATUSES: tuple[str, ...] = ("box", "rejection", "unparseable", "invalid_box", "refusal", "empty", "truncated",
                             "request_error", "missing")
FAILED_BOX: Box = (-1.0, -1.0, -1.0, -1.0)
"""The metric-record box of a failed prediction: not a rejection (so wrong on negatives), IoU 0 with
every box (so wrong on positives)."""

REQUIRED_FIELDS: tuple[str, ...] = ("sample_id", "image", "width", "height", "expression", "polarity", "bbox")


# --------------------------------------------------------------------------------------------- prompts


def check_dialect(dialect: str, coords: str = "pixels") -> None:
    if dialect not in PROMPTS:
        raise ValueError(f"unknown dialect {dialect!r}; allowed: {', '.join(EVAL_DIALECTS)}")
    if coords not in COORDS:
        raise ValueError(f"unknown coords {coords!r}; allowed: {', '.join(COORDS)}")
    if dialect == "qwen-json" and coords != "pixels":
        raise ValueError("the qwen-json dialect answers in pixels of the image the model saw: use coords 'pixels'")


def prompt_hash(dialect: str) -> str:
    """sha256 of the dialect's template source."""
    check_dialect(dialect)
    return template_hash(PROMPTS[dialect])


def prompt_version(dialect: str) -> str:
    """``"eval/<dialect>.j2@<sha256>"``: stored with every prediction, part of the response-cache key."""
    return f"{PROMPTS[dialect]}@{prompt_hash(dialect)}"


def build_messages(dialect: str, expression: str, image_part: Mapping[str, Any], width: int, height: int,
                   coords: str = "pixels") -> list[dict[str, Any]]:
    """The chat messages for one sample: the dialect's system prompt, then the image and the question.

    ``width`` x ``height`` is the size of the image *as sent* (the pixel space of a pixel answer).

    >>> m = build_messages("qwen-json", "the red cup", {"type": "image_url", "image_url": {"url": "u"}}, 504, 392)
    >>> m[1]["content"][1]["text"][:26]
    'Locate "the red cup" in th'
    """
    check_dialect(dialect, coords)
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("the expression is empty")
    macros = load_template(PROMPTS[dialect]).module
    system = str(macros.system()).strip()
    user = str(macros.user(expression.strip(), coords, int(width), int(height))).strip()
    return [{"role": "system", "content": system},
            {"role": "user", "content": [dict(image_part), {"type": "text", "text": user}]}]


def map_box(box: Sequence[float], coords: str, sent_size: tuple[int, int], original_size: tuple[int, int]
            ) -> Box | None:
    """A box the model answered, in pixels of the original image, clipped to it; None when nothing of
    a positive-area box is left (a zero-area or inverted box, or one entirely outside the image).

    ``coords`` "pixels": pixels of the image as sent (``sent_size`` = (width, height)), scaled to
    ``original_size``; "grid1000": a 0-1000 grid of each side.

    >>> map_box((10, 10, 50, 30), "pixels", (256, 192), (512, 384))
    (20.0, 20.0, 100.0, 60.0)
    >>> map_box((0, 0, 500, 1000), "grid1000", (256, 192), (512, 384))
    (0.0, 0.0, 256.0, 384.0)
    >>> map_box((10, 10, 5, 30), "pixels", (256, 192), (512, 384)) is None
    True
    """
    ow, oh = original_size
    if coords == "grid1000":
        x1, y1, x2, y2 = (float(v) for v in from_grid(tuple(box), ow, oh))
    elif coords == "pixels":
        sw, sh = sent_size
        sx, sy = ow / sw, oh / sh
        x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    else:
        raise ValueError(f"unknown coords {coords!r}; allowed: {', '.join(COORDS)}")
    if not (x2 > x1 and y2 > y1):
        return None
    x1, y1, x2, y2 = clip_boxes((x1, y1, x2, y2), ow, oh)
    if not (x2 > x1 and y2 > y1):
        return None
    return (float(x1), float(y1), float(x2), float(y2))


# ---------------------------------------------------------------------------------------------- scores


def score_from_logprobs(status: str, logprobs: Sequence[Any] | Mapping[str, Any] | None) -> float | None:
    """The confidence that an object is there, from the answer's token logprobs; None without them.

    ``logprobs``: floats, or OpenAI's ``[{"token": ..., "logprob": ...}, ...]`` (``choices[0].logprobs
    .content``). ``c = exp(mean logprob)`` (the geometric-mean token probability); a box scores ``c``, a
    rejection ``1 - c``, a failure 0.

    >>> round(score_from_logprobs("box", [math.log(0.9), math.log(0.9)]), 6)
    0.9
    >>> round(score_from_logprobs("rejection", [{"token": "[]", "logprob": math.log(0.8)}]), 6)
    0.2
    """
    if isinstance(logprobs, Mapping):  # choices[0].logprobs as a whole: {"content": [...]}
        logprobs = logprobs.get("content")
    if not logprobs:
        return None
    vals = []
    for t in logprobs:
        v = t.get("logprob") if isinstance(t, Mapping) else t
        n = finite_number(v)
        if n is None:
            return None
        vals.append(min(n, 0.0))
    c = math.exp(sum(vals) / len(vals))
    if status == "box":
        return c
    if status == "rejection":
        return 1.0 - c
    return 0.0


def score_for(status: str, logprobs: Sequence[Any] | Mapping[str, Any] | None = None) -> tuple[float, str]:
    """``(score, source)``: from the logprobs when there are some ("logprobs"), else binary ("binary":
    1 for a box, 0 for anything else)."""
    s = score_from_logprobs(status, logprobs)
    if s is not None:
        return s, "logprobs"
    return (1.0 if status == "box" else 0.0), "binary"


# --------------------------------------------------------------------------------------------- records


def check_records(records: Sequence[Mapping[str, Any]], split: str) -> None:
    """Raise ValueError naming the problem when canonical records cannot be evaluated."""
    if not records:
        raise ValueError(f"split {split!r} has no records")
    seen: set[str] = set()
    for i, r in enumerate(records):
        missing = [f for f in REQUIRED_FIELDS if f not in r]
        if missing:
            raise ValueError(f"record {i} of split {split!r} lacks {', '.join(missing)}")
        sid = r["sample_id"]
        if sid in seen:
            raise ValueError(f"sample_id {sid!r} appears twice in split {split!r}")
        seen.add(sid)
        if r["polarity"] not in ("positive", "negative"):
            raise ValueError(f"sample {sid!r}: polarity must be 'positive' or 'negative', not {r['polarity']!r}")
        if r["polarity"] == "positive" and as_box(list(r["bbox"] or [])) is None:
            raise ValueError(f"positive sample {sid!r} has no bbox [x1, y1, x2, y2]")


def prediction_record(sample: Mapping[str, Any], answer: Answer, box: Box | None, *, raw: str | None,
                      score: float, score_source: str, **extra: Any) -> dict[str, Any]:
    """One line of predictions.jsonl: the sample, the raw answer, ``bbox`` the parsed box in pixels of
    the exported image (None unless ``status == "box"``), status/reason/note, score, IoU and
    correctness. The file can be scored again with ``--predictions`` (statuses are kept).

    ``correct``: positives IoU >= 0.5 (``iou`` with the ground truth, 0 for a rejection or a
    failure); negatives a rejection (``iou`` None).
    """
    status = answer.status
    if status == "box" and box is None:
        raise ValueError("a box answer needs its mapped box")
    pos = sample["polarity"] == "positive"
    iou: float | None = None
    if pos:
        iou = float(paired_iou([box if status == "box" else None], [sample["bbox"]])[0])
        correct = iou >= 0.5 - 1e-9
    else:
        correct = status == "rejection"
    return {
        "sample_id": sample["sample_id"], "polarity": sample["polarity"], "expression": sample.get("expression"),
        "raw_answer": raw, "status": status, "reason": answer.reason, "note": answer.note,
        "bbox": list(box) if status == "box" and box is not None else None,
        "score": score, "score_source": score_source, "iou": iou, "correct@0.5": bool(correct), **extra,
    }


def _taxonomies(samples: Iterable[Mapping[str, Any]]) -> list[str]:
    names: set[str] = set()
    for s in samples:
        if isinstance(s.get("tasks"), Mapping):
            names.update(str(k) for k in s["tasks"])
    return sorted(names)


def evaluation_records(samples: Sequence[Mapping[str, Any]], predictions: Mapping[str, Mapping[str, Any]]
                       ) -> list[dict[str, Any]]:
    """The records :func:`refforge.stages.metrics.metric_table` reads, one per sample: ``pred_box`` the
    box, None for a rejection, :data:`FAILED_BOX` for a failure; ``task:<taxonomy>`` fields for each
    taxonomy of ``tasks``."""
    taxes = _taxonomies(samples)
    out = []
    for s in samples:
        p = predictions[s["sample_id"]]
        status = p["status"]
        pred = tuple(p["bbox"]) if status == "box" else (None if status == "rejection" else FAILED_BOX)
        rec = {"sample_id": s["sample_id"], "polarity": s["polarity"],
               "gt_box": tuple(s["bbox"]) if s["polarity"] == "positive" else None,
               "pred_box": pred, "score": p.get("score"), "difficulty": s.get("level"), "task": s.get("task"),
               "negative_type": s.get("negative_type") if s["polarity"] == "negative" else None,
               "positive_id": s.get("positive_id")}
        tasks = s.get("tasks") if isinstance(s.get("tasks"), Mapping) else {}
        for t in taxes:
            rec[f"task:{t}"] = tasks.get(t)
        out.append(rec)
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def summarise(samples: Sequence[Mapping[str, Any]], predictions: Mapping[str, Mapping[str, Any]]
              ) -> dict[str, Any]:
    """The metric tables: ``{"overall": row, "by_task": rows, "by_level": rows, "by_negative_type":
    rows, "by_task:<taxonomy>": rows..., "statuses": counts, "score_source": ...}``. NaN (undefined,
    e.g. AUROC with one class) becomes None (JSON null)."""
    recs = evaluation_records(samples, predictions)
    taxes = _taxonomies(samples)
    by = ("task", "difficulty", "negative_type", *(f"task:{t}" for t in taxes))
    rows = metric_table(recs, by=by)
    tables: dict[str, list[dict[str, Any]]] = {}
    overall = None
    names = {"difficulty": "level"}
    for row in rows:
        clean = {k: _clean(v) for k, v in row.items()}
        if row["group"] == "overall":
            overall = {k: v for k, v in clean.items() if k not in ("group", "value")}
            continue
        g = names.get(row["group"], row["group"])
        tables.setdefault(f"by_{g}", []).append({g: row["value"], **{k: clean[k] for k in METRIC_COLUMNS}})
    statuses = Counter(predictions[s["sample_id"]]["status"] for s in samples)
    sources = Counter(predictions[s["sample_id"]].get("score_source") for s in samples)
    source = next(iter(sources)) if len(sources) == 1 else "mixed"
    return {"overall": overall, **tables, "statuses": {k: statuses.get(k, 0) for k in STATUSES},
            "score_source": source, "score_sources": dict(sources)}


# -------------------------------------------------------------------------------------------- markdown

_MD_COLUMNS = ("n", "n_positive", "n_negative", "acc@0.5", "acc@0.75", "acc@0.9", "macc", "rejection_acc",
               "false_rejection_rate", "recall@1", "auroc", "aupr", "fpr95")
_MD_HEAD = {"n_positive": "pos", "n_negative": "neg", "false_rejection_rate": "false rej.",
            "rejection_acc": "rejection acc", "n": "n"}


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _md_table(first: str, rows: list[tuple[str, Mapping[str, Any]]]) -> list[str]:
    head = [first, *(_MD_HEAD.get(c, c) for c in _MD_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(_MD_COLUMNS)) + "|"]
    for name, row in rows:
        lines.append("| " + " | ".join([name, *(_fmt(row.get(c)) for c in _MD_COLUMNS)]) + " |")
    return lines


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """metrics.md: the run's facts, then one table overall and one per grouping."""
    m = metrics
    lines = [f"# refforge eval: {m.get('model') or m.get('source')}", ""]
    facts = [("export", m.get("export")), ("split", m.get("split")), ("dialect", m.get("dialect")),
             ("coords", m.get("coords")), ("prompt", m.get("prompt_version")), ("base_url", m.get("base_url")),
             ("predictions file", m.get("predictions_file")),
             ("samples", m.get("n_samples")), ("requests sent", (m.get("requests") or {}).get("http_requests")),
             ("score", m.get("score_note") or m.get("score_source"))]
    lines += [f"- {k}: {v}" for k, v in facts if v is not None]
    statuses = {k: v for k, v in (m.get("statuses") or {}).items() if v}
    lines.append("- answers: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    lines += ["", "Failures (unparseable, refusals, invalid boxes, failed requests, missing predictions) are "
              "wrong on positives and on negatives. – = undefined (e.g. AUROC without both classes).", ""]
    lines += ["## Overall", "", *_md_table("", [("all", m["overall"])]), ""]
    levels = m.get("by_level") or []
    if levels:
        lines += ["Precision@1 per level (FineCops-Ref; = Acc@0.5 on the level's positives): "
                  + ", ".join(f"L{r['level']} {_fmt(r.get('precision@1'))}" for r in levels), ""]
    for key, rows in m.items():
        if not key.startswith("by_") or not isinstance(rows, list):
            continue
        g = key[3:]
        lines += [f"## By {g}", "", *_md_table(g, [(str(r[g]), r) for r in rows]), ""]
    for entry in (m.get("benchmarks") or {}).values():
        lines += _benchmark_markdown(entry)
    if m.get("benchmarks"):
        lines += ["## refforge's definitions and the benchmarks'", "", *DEFINITIONS_MD, ""]
    return "\n".join(lines)


DEFINITIONS_MD: tuple[str, ...] = (
    "The tables above headed *Overall* and *By ...* use refforge's own definitions (stages/metrics.py); the "
    "benchmark sections use each benchmark's, computed as its public code computes them, under its prefix. "
    "Where they differ:",
    "",
    "- **Acc@t** (refforge): positives only, `IoU >= t` with a 1e-9 tolerance. **groundingme.acc@t**: every "
    "sample, a correct rejection counting as IoU 1, so rejections raise or lower it.",
    "- **mAcc** (refforge): thresholds 0.50..0.90 in exact steps, inclusive. **refbench_pro.macc**: numpy's "
    "`np.arange(0.5, 0.95, 0.05)`, whose float steps make an IoU of exactly 0.6, 0.65, ..., 0.9 fail that "
    "step; per task type, the reject type scored as rejection accuracy (`pred_bbox == [0, 0, 0, 0]`).",
    "- **Recall@k** (refforge): a pool is the positive with its negatives by `positive_id`, ranked by one score "
    "per sample, ties ranked against the positive; the box is not checked. **finecops.recall@k**: pools per "
    "(negative type, negative level, negative category), every box's score >= 0 counted, ties counted as "
    "hits, and a hit needs the positive's top box(es) at IoU >= 0.5.",
    "- **AUROC / AUPR / FPR95** (refforge): all positives against all negatives; FPR95 at the first threshold "
    "reaching TPR 0.95. **finecops.auroc** etc.: level-1 positives only against all negatives; FPR95 at the "
    "threshold whose recall is closest to 0.95; per negative group, a positive counted once per paired negative.",
    "- Answers: refforge reads pixels of the image (or a 0-1000 grid with `coords grid1000`); FineCops-Ref "
    "decodes 0-1000 answers with integer truncation; GroundingME accepts 0-1, 0-999 and pixel coordinates.",
)


def _benchmark_markdown(entry: Mapping[str, Any]) -> list[str]:
    up = entry.get("upstream") or {}
    files = ", ".join(up.get("files") or ())
    repo = str(up.get("repo", "?")).removeprefix("https://github.com/")
    where = f"{repo} {files} at {str(up.get('commit', '?'))[:12]}"
    lines = [f"## {entry.get('title')} (as {where} computes it)", ""]
    if entry.get("native_file"):
        lines.append(f"Scored from `{entry['native_file']}` ({entry.get('lines_from')}).")
        lines.append("")
    metrics = entry.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
        lines.append("")
    for name, rows in (entry.get("tables") or {}).items():
        if not rows:
            continue
        cols = list(rows[0])
        lines += [f"### {name}", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
        lines.append("")
    lines += [f"- {n}" for n in entry.get("notes") or ()]
    if entry.get("notes"):
        lines.append("")
    return lines
