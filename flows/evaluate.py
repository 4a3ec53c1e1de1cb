"""`refforge eval`: run a VLM on an export's split (or read predictions made elsewhere) and score it.

::

    from refforge.flows.evaluate import run_eval
    metrics = run_eval("exports/demo", model="Qwen/Qwen2.5-VL-7B-Instruct",
                       base_url="http://gpu-box:8000/v1", dialect="qwen-json")
    metrics["overall"]["acc@0.5"], metrics["out"]

The model path sends one chat request per sample through :class:`~refforge.llm.LLMClient` (bounded
concurrency, retries with backoff, rate limits waited out) with a persistent response cache in
``<out>/cache/llm.sqlite``: a re-run sends zero requests. Images go as data URLs, resized to
``image_longest_side``; for ``qwen-json`` the sides are also rounded down to multiples of 28 (Qwen2.5-VL's
patch grid), so that the server's own resize leaves the image as sent and the model's absolute pixels
are pixels of the sent image. Answers are mapped back to pixels of the exported image.

Samples are processed in chunks grouped by image (each image is read and encoded once per chunk),
so memory stays bounded on large splits.

Outputs (``out``, default ``<export>/eval/<model-slug>-<dialect>/``, or ``<export>/eval/<file stem>/`` for ``--predictions``):

* ``predictions.jsonl``: one line per sample, in split order (see
  :func:`refforge.stages.evaluate.prediction_record`), with the prompt version and the model;
* ``metrics.json``: overall and per task (each taxonomy), level and negative type; statuses; the
  score source; dialect, prompt version and hash, model, base_url, the name of the key variable
  (never the key), requests and tokens from the client;
* ``metrics.md``: the same tables for people.

Failure policy: bad input (missing export, split, image, bad predictions file, unknown sample ids)
raises :class:`EvalError` before any request. A model's bad answer is a prediction with a status and
a reason. A failed request (endpoint down past the retries, rate-limit budget spent, bad key) is a
prediction with status ``request_error``, scored wrong, and counted in ``metrics.json["incomplete"]``;
answers that did arrive are cached, so a re-run sends only the failed requests again.

``--predictions FILE`` reads predictions made elsewhere. Its kind is detected from its lines
(:func:`refforge.stages.benchmarks.detect_format`; ``predictions_format`` names it instead) and a file
that fits several kinds, mixes kinds or fits none is refused with one line:

* refforge's own (:func:`read_predictions`): JSON Lines with ``sample_id`` and either ``bbox``
  (``[x1, y1, x2, y2]`` pixels of the exported image; null, ``[]`` or four zeros = "no object") or
  ``answer`` (raw model text, parsed like the model path; its boxes are pixels of the exported image,
  or a 0-1000 grid with ``coords="grid1000"``), optionally ``score``, and optionally ``status``: a
  failure status of :data:`refforge.stages.evaluate.STATUSES` keeps the line a failure, so a run's own
  predictions.jsonl scores again to the same metrics;
* a benchmark's own prediction file (FineCops-Ref's jsonl with ``image_id`` / ``text`` / ``sum_log_prob``,
  RefBench-PRO's with ``bbox`` (ground truth) and ``pred_bbox``, GroundingME's): its lines are mapped to
  the split's samples by that benchmark's module (``from_native``) for refforge's metrics, and scored as
  they are for that benchmark's metrics.

A line that matches no sample of the split is an error (wrong export or split); a sample of the split
without a prediction is status ``missing``, scored wrong, and counted in ``metrics.json["missing"]``.

Besides refforge's own metrics, ``metrics.json["benchmarks"]`` holds each benchmark's metrics computed
as its public scorer computes them (``finecops.*``, ``refbench_pro.*``, ``groundingme.*``), from the
native prediction lines written to ``<out>/native/<benchmark>.jsonl``: run the benchmark's own scorer
on that file and it prints the same numbers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic

from refforge import __version__
from refforge.llm import ChatRequest, EndpointError, LLMOutputError, LLMRequestError
from refforge.llm.endpoint import ModelEndpoint, endpoint_client
from refforge.stages import benchmarks
from refforge.stages import evaluate as ev
from refforge.stages.answers import Answer, parse_answer
from refforge.stages.export_records import read_canonical
from refforge.storage.atomic import atomic_write_bytes

__all__ = ["EvalError", "model_slug", "read_predictions", "run_eval", "score_predictions"]

STAGE = "eval"
QWEN_PATCH = 28


class EvalError(ValueError):
    """Input that cannot be evaluated; the message says what and where."""


def model_slug(name: str) -> str:
    """A folder name for a model id: ``"Qwen/Qwen2.5-VL-7B-Instruct"`` -> ``"Qwen--Qwen2.5-VL-7B-Instruct"``.

    >>> model_slug("Qwen/Qwen2.5-VL-7B-Instruct"), model_slug("gpt-4o mini")
    ('Qwen--Qwen2.5-VL-7B-Instruct', 'gpt-4o-mini')
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("/", "--")).strip("-.")
    return slug or "model"


def _load_samples(export_dir: Path, split: str, limit: int | None
                  ) -> tuple[list[dict[str, Any]], set[str], list[dict[str, Any]]]:
    """The split's records (the first ``limit``), checked; the sample ids of the whole split; the whole split."""
    if not export_dir.is_dir():
        raise EvalError(f"{export_dir} is not a directory (an export made by `refforge export`)")
    try:
        records = read_canonical(export_dir, split)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    all_ids = {str(r.get("sample_id")) for r in records}
    whole = records
    if limit is not None:
        if limit < 1:
            raise EvalError("--limit must be at least 1")
        records = records[:limit]
    try:
        ev.check_records(records, split)
    except ValueError as e:
        raise EvalError(str(e)) from None
    return records, all_ids, whole


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _write_outputs(out: Path, samples: Sequence[Mapping[str, Any]], preds: Mapping[str, dict[str, Any]],
                   meta: dict[str, Any], native: tuple[str, Sequence[Mapping[str, Any]]] | None = None
                   ) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(_finite(preds[s["sample_id"]]), default=_json_default) for s in samples]
    _write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
    metrics = {**meta, **ev.summarise(samples, preds)}
    metrics["benchmarks"] = benchmark_metrics(samples, preds, out, native)
    metrics["n_samples"] = len(samples)
    metrics["incomplete"] = metrics["statuses"].get("request_error", 0)
    metrics["missing"] = metrics["statuses"].get("missing", 0)
    metrics = _finite(metrics)
    _write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=_json_default) + "\n")
    _write_text(out / "metrics.md", ev.metrics_markdown(metrics))
    metrics["out"] = str(out)
    return metrics


# ----------------------------------------------------------------------------------------------- images


def _qwen_size(width: int, height: int, longest_side: int) -> tuple[int, int]:
    """Fit into ``longest_side``, then round each side down to a multiple of 28 (at least 28)."""
    scale = min(1.0, longest_side / max(width, height))
    w, h = width * scale, height * scale
    return max(QWEN_PATCH, int(w // QWEN_PATCH) * QWEN_PATCH), max(QWEN_PATCH, int(h // QWEN_PATCH) * QWEN_PATCH)


def _encode(client: Any, path: Path, dialect: str) -> Any:
    """The EncodedImage to send (its ``width``/``height`` are the pixels the model answers in)."""
    if dialect != "qwen-json":
        return client.encode_image(path)
    from PIL import Image

    with Image.open(path) as img:
        size = _qwen_size(img.width, img.height, client.image_longest_side)
        if size != img.size:
            img = img.convert("RGB") if img.mode not in ("RGB", "RGBA", "L") else img
            return client.encode_image(img.resize(size, Image.Resampling.LANCZOS), fmt="png")
        return client.encode_image(path)


def _mapped(answer: Answer, coords: str, sent_size: tuple[int, int], original_size: tuple[int, int]
            ) -> tuple[Answer, ev.Box | None]:
    """(answer, box in pixels of the original image); a box with no area inside the image becomes
    an ``invalid_box`` answer."""
    if answer.status != "box":
        return answer, None
    box = ev.map_box(answer.box, coords, sent_size, original_size)
    if box is None:
        answer = Answer("invalid_box", answer.box, reason=f"box {list(answer.box)} has no area "
                               "inside the image", note=answer.note)
    return answer, box


# ------------------------------------------------------------------------------------------- model path


def _answer_from_result(res: Any) -> tuple[Answer, str | None, Any]:
    """(parsed answer, raw text, logprobs) of one run_many outcome."""
    if isinstance(res, LLMRequestError):
        return Answer("request_error", reason=f"{res.reason}: {res.detail}"[:300]), None, None
    if isinstance(res, LLMOutputError):
        status = res.reason if res.reason in ("refusal", "empty", "truncated") else "unparseable"
        return Answer(status, reason=res.detail or res.reason), res.text, None
    # ChatResult: logprobs only where the client exposes them (see score_note in metrics.json)
    return parse_answer(res.text, lenient=True), res.text, getattr(res, "logprobs", None)


def _run_model(samples: list[dict[str, Any]], root: Path, client: Any, dialect: str, coords: str,
               logprobs: bool, max_tokens: int | None, chunk_size: int,
               progress: Callable[[int, int], None] | None) -> dict[str, dict[str, Any]]:
    pv = ev.prompt_version(dialect)
    extra = {"logprobs": True} if logprobs else None
    order = sorted(range(len(samples)), key=lambda i: (str(samples[i]["image"]), i))
    preds: dict[str, dict[str, Any]] = {}
    done = 0
    for start in range(0, len(order), chunk_size):
        chunk = [samples[i] for i in order[start:start + chunk_size]]
        encoded: dict[str, Any] = {}
        reqs = []
        for s in chunk:
            rel = str(s["image"])
            if rel not in encoded:
                encoded[rel] = _encode(client, root / rel, dialect)
            enc = encoded[rel]
            msgs = ev.build_messages(dialect, s["expression"], enc.part, enc.width, enc.height, coords)
            reqs.append(ChatRequest(msgs, pv, STAGE, temperature=0, max_tokens=max_tokens, extra=extra))
        results = client.run_many(reqs, raise_request_errors=False)
        for s, res in zip(chunk, results, strict=True):
            enc = encoded[str(s["image"])]
            answer, raw, lp = _answer_from_result(res)
            answer, box = _mapped(answer, coords, (enc.width, enc.height), (int(s["width"]), int(s["height"])))
            score, source = ev.score_for(answer.status, lp)
            preds[s["sample_id"]] = ev.prediction_record(
                s, answer, box, raw=raw, score=score, score_source=source,
                answer_box=list(answer.box) if answer.box is not None else None,
                sent_size=[enc.width, enc.height], cached=bool(getattr(res, "cached", False)),
                prompt_version=pv)
        done += len(chunk)
        if progress is not None:
            progress(done, len(samples))
    return preds


def _make_client(model: str, base_url: str, api_key_env: str | None, concurrency: int, timeout_s: float,
                 max_retries: int, image_longest_side: int, cache_path: Path) -> Any:
    """The same client a build makes for an endpoint (:func:`refforge.llm.endpoint.endpoint_client`),
    validated by :class:`~refforge.llm.endpoint.ModelEndpoint`, with the eval's own cache."""
    try:
        ep = ModelEndpoint(base_url=base_url, model=model, api_key_env=api_key_env or None, concurrency=concurrency,
                           timeout_s=timeout_s, max_retries=max_retries, image_longest_side=image_longest_side)
    except pydantic.ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise EvalError(msgs) from None
    if not re.match(r"^https?://", ep.base_url):
        raise EvalError(f"--base-url must start with http:// or https://, not {ep.base_url!r}")
    return endpoint_client(ep, cache_path)


# -------------------------------------------------------------------------------------- predictions path


def read_prediction_lines(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a predictions file, each with ``_line`` (its line, or its index in an array).

    JSON Lines (one object a line), or one JSON array of objects (GroundingME's ``results.json``
    style), or one JSON object that a benchmark module unpacks (``lines_from_document``). Raises
    EvalError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"predictions file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    stripped = text.lstrip()
    lines: list[dict[str, Any]] = []
    whole: Any = None
    if stripped[:1] in ("[", "{"):
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None  # JSON Lines (several objects), read below
    if isinstance(whole, list):
        for i, obj in enumerate(whole, start=1):
            if not isinstance(obj, dict):
                raise EvalError(f"{p}: item {i} of the JSON array is not an object")
            lines.append({**obj, "_line": i})
    elif isinstance(whole, dict) and (got := _unpack_document(whole)) is not None:
        lines = [{**obj, "_line": i} for i, obj in enumerate(got, start=1)]
    else:  # JSON Lines (a one-line file parses as one object too)
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise EvalError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise EvalError(f"{p}:{n}: each line must be a JSON object")
            lines.append({**obj, "_line": n})
    if not lines:
        raise EvalError(f"predictions file {p} holds no predictions")
    return lines


def _unpack_document(doc: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The prediction lines of a whole-file JSON object, if a benchmark module knows the document."""
    for m in benchmarks.scorers():
        unpack = getattr(m, "lines_from_document", None)
        got = unpack(doc) if unpack is not None else None
        if got is not None:
            return got
    return None


def _finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _without_line_numbers(lines: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The lines as the file holds them (without the ``_line`` that :func:`read_prediction_lines` adds)."""
    return [{k: v for k, v in ln.items() if k != "_line"} for ln in lines]


def _refforge_lines(lines: Sequence[Mapping[str, Any]], p: Path | str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for obj in lines:
        n = obj["_line"]
        if not isinstance(obj.get("sample_id"), str):
            raise EvalError(f"{p}:{n}: each line must be a JSON object with a string sample_id")
        if "bbox" not in obj and "answer" not in obj:
            raise EvalError(f"{p}:{n}: sample {obj['sample_id']!r} has neither 'bbox' nor 'answer'")
        if obj["sample_id"] in out:
            raise EvalError(f"{p}:{n}: sample {obj['sample_id']!r} appears twice")
        score = obj.get("score")
        if score is not None and not _finite_number(score):
            raise EvalError(f"{p}:{n}: score must be a finite number or null, not {score!r}")
        out[obj["sample_id"]] = dict(obj)
    return out


def read_predictions(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{sample_id: line}`` of a predictions file in refforge's own format (JSON Lines). Raises EvalError
    naming the line."""
    return _refforge_lines(read_prediction_lines(path), path)


def _native_lines_as_refforge(kind: str, lines: Sequence[Mapping[str, Any]], split_samples: Sequence[Mapping[str, Any]],
                              where: str) -> dict[str, dict[str, Any]]:
    """A benchmark's native prediction lines as refforge prediction lines (``sample_id``, ``bbox`` or a
    failure ``status``, ``score``, ``raw_answer``), through the benchmark module's ``from_native``."""
    try:
        got = benchmarks.scorer(kind).from_native(list(lines), list(split_samples))
    except ValueError as e:
        raise EvalError(f"{where}: {e}") from None
    out: dict[str, dict[str, Any]] = {}
    for n, (sid, p) in enumerate(got.items(), start=1):
        status = p.get("status")
        line: dict[str, Any] = {"sample_id": sid, "_line": n, "score": p.get("score"),
                                "raw_answer": p.get("raw_answer")}
        if status == "box":
            line["bbox"] = [float(v) for v in p["bbox"]]
        elif status == "rejection":
            line["bbox"] = None
        else:
            line.update(bbox=None, status=status if status in ev.STATUSES else "unparseable",
                        reason=p.get("reason") or f"the {kind} line gave no box")
        if not _finite_number(line["score"]):
            line["score"] = None
        out[sid] = line
    return out


def benchmark_metrics(samples: Sequence[Mapping[str, Any]], preds: Mapping[str, Mapping[str, Any]], out: Path | None,
                      native: tuple[str, Sequence[Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """Each benchmark's metrics as its own code computes them (``stages/benchmarks``), from that
    benchmark's native prediction lines: the file's own lines when ``native`` = (its benchmark, its
    lines), else lines made from ``preds`` (written to ``out/native/<benchmark>.jsonl`` so that the
    benchmark's scorer can be run on exactly what was scored)."""
    result: dict[str, Any] = {}
    for m in benchmarks.scorers():
        if native is not None and native[0] == m.NAME:
            lines = list(native[1])
            origin = "the predictions file"
        else:
            lines = m.native_predictions(list(samples), preds)
            origin = "converted from refforge's predictions"
        entry: dict[str, Any] = {"title": m.TITLE, "upstream": m.UPSTREAM, "lines_from": origin}
        try:
            entry.update(m.score(list(samples), lines))
        except ValueError as e:
            entry.update(metrics={}, tables={}, notes=[f"not computed: {e}"])
        if out is not None:
            target = out / "native" / f"{m.NAME}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_text(target, "".join(json.dumps(_finite(ln), default=_json_default) + "\n" for ln in lines))
            entry["native_file"] = str(target.relative_to(out))
        result[m.NAME] = entry
    return result


def _bbox_answer(value: Any, where: str) -> Answer:
    if value is None or value == []:
        return Answer("rejection")
    if (not isinstance(value, list) or len(value) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise EvalError(f"{where}: bbox must be [x1, y1, x2, y2] (numbers), null or [], not {value!r}")
    if all(v == 0 for v in value):
        return Answer("rejection")
    return Answer("box", tuple(float(v) for v in value))  # type: ignore[arg-type]


def score_predictions(samples: Sequence[Mapping[str, Any]], given: Mapping[str, Mapping[str, Any]],
                      coords: str = "pixels", where: str = "predictions",
                      split_ids: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Prediction records for ``samples`` from a predictions file's lines (see the module doc).

    ``split_ids``: every sample id of the split (``samples`` may be its first ``--limit``); lines for
    split samples left out by the limit are ignored, lines for ids outside the split are an error."""
    ids = split_ids if split_ids is not None else {s["sample_id"] for s in samples}
    unknown = [k for k in given if k not in ids]
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise EvalError(f"{len(unknown)} sample id(s) of {where} are not in the evaluated split: {shown} "
                        "(wrong export or --split?)")
    preds: dict[str, dict[str, Any]] = {}
    for s in samples:
        line = given.get(s["sample_id"])
        size = (int(s["width"]), int(s["height"]))
        if line is None:
            answer, raw = Answer("missing", reason="no prediction for this sample"), None
        elif line.get("status") in ev.STATUSES and line["status"] not in ev.ANSWER_STATUSES:
            # a failure recorded by an earlier run (its predictions.jsonl scored again) stays a failure
            answer = Answer(line["status"], reason=line.get("reason") or "failed in the run that made the file")
            raw = line.get("raw_answer")
        elif "bbox" in line:
            answer, raw = _bbox_answer(line["bbox"], f"{where}:{line['_line']}"), None
            if line.get("answer") is not None or line.get("raw_answer") is not None:
                raw = str(line["answer"] if line.get("answer") is not None else line["raw_answer"])
        else:
            raw = line["answer"] if line["answer"] is None else str(line["answer"])
            answer = parse_answer(raw, lenient=True)
        answer, box = _mapped(answer, coords if line is not None and "bbox" not in line else "pixels", size, size)
        if line is not None and line.get("score") is not None:
            score, source = float(line["score"]), "file"
        else:
            score, source = ev.score_for(answer.status)
        preds[s["sample_id"]] = ev.prediction_record(s, answer, box, raw=raw, score=score, score_source=source)
    return preds


# ------------------------------------------------------------------------------------------------- entry


def run_eval(export_dir: str | Path, *, model: str | None = None, base_url: str | None = None,
             api_key_env: str | None = "OPENAI_API_KEY", dialect: str = "groundingme", coords: str = "pixels",
             split: str = "test", concurrency: int = 8, limit: int | None = None, logprobs: bool = False,
             predictions: str | Path | None = None, out: str | Path | None = None,
             image_longest_side: int = 1024, timeout_s: float = 60, max_retries: int = 5,
             max_tokens: int | None = None, chunk_size: int = 256, predictions_format: str = "auto",
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate a model (or a predictions file) on one split of an export; returns metrics.json's
    content plus ``"out"`` (the output folder). See the module doc for the files and the policies."""
    root = Path(export_dir)
    try:
        ev.check_dialect(dialect, coords)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if predictions is None and (not model or not base_url):
        raise EvalError("give --model and --base-url to run a model, or --predictions FILE to score predictions")
    if concurrency < 1:
        raise EvalError("--concurrency must be at least 1")
    if chunk_size < 1:
        raise EvalError("chunk_size must be at least 1")
    samples, split_ids, whole = _load_samples(root, split, limit)
    given: dict[str, dict[str, Any]] | None = None
    native: tuple[str, list[dict[str, Any]]] | None = None
    kind = None
    if predictions is not None:
        lines = read_prediction_lines(predictions)
        try:
            kind = benchmarks.detect_format(lines, predictions_format, where=str(predictions))
        except benchmarks.FormatError as e:
            raise EvalError(str(e)) from None
        if kind == benchmarks.REFFORGE:
            given = _refforge_lines(lines, predictions)
        else:
            lines = _without_line_numbers(lines)
            given = _native_lines_as_refforge(kind, lines, whole, str(predictions))
            # the file's own lines are scored as they are when they cover what is evaluated; with --limit
            # the benchmark's lines are made again from the evaluated samples' predictions
            native = (kind, lines) if limit is None else None
    name = model or (Path(predictions).stem if predictions is not None else "model")
    # one folder per model and dialect: a second dialect does not overwrite the first
    out_dir = Path(out) if out is not None else root / "eval" / (
        model_slug(name) if predictions is not None else f"{model_slug(name)}-{model_slug(dialect)}")
    meta: dict[str, Any] = {
        "refforge": __version__, "export": str(root), "split": split, "limit": limit, "model": model,
        "dialect": dialect, "coords": coords, "prompt_version": ev.prompt_version(dialect),
        "prompt_hash": ev.prompt_hash(dialect),
    }
    if given is not None:
        preds = score_predictions(samples, given, coords, where=str(predictions), split_ids=split_ids)
        sources = {p["score_source"] for p in preds.values()}
        meta.update(source="predictions", predictions_file=str(predictions), predictions_format=kind,
                    base_url=None, requests=None, logprobs_requested=False,
                    score_note="scores from the file" if sources == {"file"} else
                    "binary: 1 = answered a box, 0 = rejected or failed" if sources == {"binary"} else
                    "scores from the file where given, else binary")
        return _write_outputs(out_dir, samples, preds, meta, native)

    missing_images = sorted({str(s["image"]) for s in samples if not (root / str(s["image"])).is_file()})
    if missing_images:
        raise EvalError(f"{len(missing_images)} image(s) of split {split!r} are missing under {root}: "
                        f"{', '.join(missing_images[:3])}")
    out_dir.mkdir(parents=True, exist_ok=True)
    client = _make_client(model, base_url, api_key_env, concurrency, timeout_s, max_retries, image_longest_side,
                          out_dir / "cache" / "llm.sqlite")
    try:
        try:  # the endpoint answers, serves the model and takes images: else one line, before any sample
            client.preflight(images=True, label="eval")
        except EndpointError as e:
            raise EvalError(str(e)) from None
        preds = _run_model(samples, root, client, dialect, coords, logprobs, max_tokens, chunk_size, progress)
        usage = client.usage().get(STAGE, {})
    finally:
        cache = client.cache
        client.close()
        if cache is not None:
            cache.close()
    sources = {p["score_source"] for p in preds.values()}
    if sources == {"logprobs"}:
        note = "logprobs: c = exp(mean token logprob); a box scores c, a rejection 1 - c"
    elif logprobs:
        note = ("binary: logprobs were requested but not returned for every answer (1 = answered a box, "
                "0 = rejected or failed)")
    else:
        note = "binary: 1 = answered a box, 0 = rejected or failed (no logprobs requested)"
    meta.update(source="model", base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
                image_longest_side=image_longest_side, max_tokens=max_tokens, logprobs_requested=logprobs,
                score_note=note, requests=usage,
                tokens={"prompt": usage.get("prompt_tokens", 0), "completion": usage.get("completion_tokens", 0)})
    return _write_outputs(out_dir, samples, preds, meta)
