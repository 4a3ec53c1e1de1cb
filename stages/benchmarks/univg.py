"""The trainer formats: ``r1`` for UniVG-R1's GRPO stage (and an open-r1 layout), ``sft`` for LLaMA-Factory.

No metrics here: these formats feed trainers. Each was checked against the trainer's public code
(:data:`UPSTREAM`); nothing of that code is copied, the records are made to what it reads.

r1: UniVG-R1 (``src/open-r1-multimodal/src/open_r1/grpo_univg.py`` and ``vlm_modules/qwen_module.py``)
--------------------------------------------------------------------------------------------------
UniVG-R1's ``LazySupervisedDataset`` reads ONE JSON array (``json.load``) and uses, per example,
``question`` (``<image>`` markers are removed, the model sees the images first, then the question
followed by UniVG-R1's own instruction "First output the thinking process in <think> </think> tags and
then output the bounding box in <answer> </answer> tags."), ``answer`` (handed to the reward as the
solution) and ``images`` (a list of paths the trainer opens with ``PIL.Image.open`` as given: relative
paths are relative to the trainer's working directory; ``--image_root`` is parsed but never used).
Its accuracy reward (``iou_reward``) takes the completion's ``<answer>`` element, reads the first
``(x1,y1),(x2,y2)`` of non-negative INTEGERS in it and returns its IoU with ``answer``, which must be a
list of four numbers in the same frame (an exact answer earns 1.0; anything unreadable 0.0; the
reward's IoU subtracts 1 from the right and bottom edges for the intersection, so a box less than 2
units wide or tall scores 0 even against itself). Its format reward wants
``<think>...</think><answer>(x1,y1),(x2,y2)</answer>`` at the end of the completion.

So ``r1/<split>.json`` is a JSON array of ``{id, question, answer, images, width, height, expression}``:

* ``question``: ``"<image>"`` then the task (:func:`r1_question`), which asks for ``(x1,y1),(x2,y2)``;
* ``answer``: ``[x1, y1, x2, y2]`` integers: on the 0-1000 grid of each image side for the
  ``grid1000`` and ``qwen2vl`` dialects (Qwen2-VL, UniVG-R1's base model, reads and writes boxes on
  that grid), else integer pixels of the exported image (Qwen2.5-VL-style absolute coordinates;
  the trainer resizes images to at most ``--max_pixels``, so pixels are right only for images within
  that budget: use a grid dialect otherwise). Ints round half away from zero
  (:func:`refforge.stages.scene.boxes.round_box` / ``to_grid``);
* ``images``: ``[path]`` relative to the export root: run the trainer from the export root
  (``cd <export> && torchrun ... --dataset_name r1/train.json``).

No target: UniVG-R1's reward has no way to score a rejection (there is no box to compare, and an
all-zero solution divides by zero, which the reward turns into 0.0 for every completion), so
negatives are LEFT OUT of ``r1/<split>.json`` and counted in the manifest (``left_out``), as are
positives whose integer answer would be thinner than 2 units (reward 0 even for the exact answer).
They stay in the open-r1 layout below, where a no-target sample is ``<answer>none</answer>``.

The open-r1 layout stays available as a second file: ``r1/open-r1/<split>.jsonl``, one JSON object a
line, ``{id, image, problem, solution, width, height}`` (``solution`` = ``<answer>BOX</answer>`` in the
export's box dialect, or ``<answer>none</answer>`` for a negative; ``image`` relative to the export
root), every sample included, for GRPO trainers in open-r1-multimodal's naming whose reward parses the
``<answer>`` text. ``r1/refforge.json`` records the coordinate frame, the dialect and the image root.

sft: LLaMA-Factory (``src/llamafactory/data/converter.py``, ``parser.py``, ``mm_plugin.py``)
------------------------------------------------------------------------------------------
``sft/<split>.json``: a JSON array of ``{id, messages: [{role: "user", content}, {role: "assistant",
content}], images: [path]}``, and ``sft/dataset_info.json`` registering ``refforge_<split>`` with
``formatting: "sharegpt"``, ``columns: {messages, images}`` and ``tags: {role_tag: "role", content_tag:
"content", user_tag: "user", assistant_tag: "assistant"}`` (the layout of LLaMA-Factory's own
``mllm_demo``). The rules its sharegpt converter and multimodal plugin enforce, and the export keeps:
roles alternate user / assistant starting with the user and the count is even (else the example is
dropped as broken); the number of ``<image>`` placeholders over all messages equals
``len(images)`` (else a ValueError), so the user turn holds exactly one ``<image>`` and any
``<image>`` / ``<video>`` / ``<audio>`` inside an expression or a trace is written ``[image]`` /
``[video]`` / ``[audio]`` (counted in the manifest). Image paths are relative to the export root:
train with ``dataset_dir: <export>/sft`` and ``media_dir: <export>`` (LLaMA-Factory joins
``media_dir`` and the path).

The user turn asks for the box in the dialect (:data:`SFT_DIALECTS`); the assistant turn is the
sample's selected ``<think>...</think><answer>...</answer>`` trace with its boxes rewritten in the
dialect, or the ``<answer>`` alone. Dialects per model family:

==============  =====================================================  ==============================
dialect         answer                                                 model family
==============  =====================================================  ==============================
``qwen2vl``     ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``, 0-1000     Qwen2-VL (UniVG-R1's stage 1)
``qwen_json``   ``{"bbox_2d": [x1, y1, x2, y2]}``, integer pixels       Qwen2.5-VL (absolute coords)
``grid1000``    ``[x1, y1, x2, y2]``, 0-1000 integers                   InternVL / Qwen2-VL-style lists
``pixels``      ``[x1, y1, x2, y2]``, integer pixels                    pixel lists
``pairs``       ``(x1,y1),(x2,y2)``, integer pixels                     pixel pairs
==============  =====================================================  ==============================

No target: ``<answer>none</answer>`` in every dialect (the user turn says so).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from refforge.stages.answers import parse_answer
from refforge.stages.scene.boxes import DIALECTS, format_box, from_grid, round_box, to_grid
from refforge.storage.atomic import atomic_write_bytes

__all__ = [
    "GRID_DIALECTS",
    "NAME",
    "NO_TARGET",
    "SFT_DIALECTS",
    "TITLE",
    "UPSTREAM",
    "answer_text",
    "box_text",
    "open_r1_record",
    "r1_question",
    "r1_record",
    "read_open_r1",
    "read_r1",
    "read_sft",
    "sft_record",
    "write_r1",
    "write_sft",
]

NAME = "univg"
TITLE = "UniVG-R1 (r1) and LLaMA-Factory (sft)"
UPSTREAM: dict[str, Any] = {
    "r1": {
        "repo": "https://github.com/AMAP-ML/UniVG-R1",
        "commit": "44868ea30073c104d026186418291757454ae9d7",
        "files": ["src/open-r1-multimodal/src/open_r1/grpo_univg.py",
                  "src/open-r1-multimodal/src/open_r1/vlm_modules/qwen_module.py",
                  "src/open-r1-multimodal/src/open_r1/trainer/grpo_trainer.py",
                  "src/open-r1-multimodal/run_scripts/run_grpo_univg.sh", "README.md"],
    },
    "sft": {
        "repo": "https://github.com/hiyouga/LLaMA-Factory",
        "commit": "ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30",
        "files": ["src/llamafactory/data/converter.py", "src/llamafactory/data/parser.py",
                  "src/llamafactory/data/mm_plugin.py", "src/llamafactory/extras/constants.py",
                  "data/dataset_info.json"],
    },
}

SFT_DIALECTS: tuple[str, ...] = (*DIALECTS, "qwen2vl")
"""refforge's box dialects plus ``qwen2vl`` (Qwen2-VL's ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on 0-1000)."""
GRID_DIALECTS: frozenset[str] = frozenset({"grid1000", "qwen2vl"})
NO_TARGET = "<answer>none</answer>"
PLACEHOLDERS: tuple[str, ...] = ("<image>", "<video>", "<audio>")
"""LLaMA-Factory's media placeholders (``extras/constants.py`` defaults)."""
UNIVG_COCO_MARK = "dataset/coco/train2014/COCO"
"""A path containing this switches UniVG-R1's reward and prompt to its COCO mode: refused in exports."""

_HELP: dict[str, str] = {
    "pixels": "as [x1, y1, x2, y2] in integer pixels of the image",
    "grid1000": "as [x1, y1, x2, y2] in integers on a 0-1000 grid of the image width and height",
    "pairs": "as (x1,y1),(x2,y2) in integer pixels of the image",
    "qwen_json": 'as {"bbox_2d": [x1, y1, x2, y2]} in integer pixels of the image',
    "qwen2vl": "as <|box_start|>(x1,y1),(x2,y2)<|box_end|> in integers on a 0-1000 grid of the image width "
               "and height",
}
_PROBLEM = re.compile(r'Locate the object that "(.*)" refers to', re.S)
_LIST4 = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,"
                    r"\s*(-?\d+(?:\.\d+)?)\s*\]")
_ANSWER = re.compile(r"<answer>.*?</answer>", re.S)
_BOX_TOKENS = re.compile(r"<\|box_start\|>|<\|box_end\|>")


def _check(dialect: str) -> None:
    if dialect not in SFT_DIALECTS:
        raise ValueError(f"unknown box dialect {dialect!r}; expected one of {', '.join(SFT_DIALECTS)}")


def _json(obj: Any, indent: int | None = None) -> bytes:
    return json.dumps(obj, ensure_ascii=False, indent=indent).encode("utf-8")


def _escape(text: str) -> tuple[str, int]:
    """``text`` with LLaMA-Factory's media placeholders written ``[image]`` etc.; and how many."""
    n = 0
    for tok in PLACEHOLDERS:
        k = text.count(tok)
        if k:
            n += k
            text = text.replace(tok, f"[{tok[1:-1]}]")
    return text, n


def _ints(rec: Mapping[str, Any], grid: bool) -> tuple[int, int, int, int]:
    box = rec["bbox"]
    if grid:
        return tuple(int(v) for v in to_grid(box, rec["width"], rec["height"], 1000))  # type: ignore[return-value]
    return tuple(int(v) for v in round_box(box))  # type: ignore[return-value]


def box_text(rec: Mapping[str, Any], dialect: str) -> str:
    """The record's box as text in a dialect of :data:`SFT_DIALECTS`."""
    _check(dialect)
    if dialect == "qwen2vl":
        x1, y1, x2, y2 = _ints(rec, grid=True)
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    return format_box(rec["bbox"], dialect, rec["width"], rec["height"])  # type: ignore[arg-type]


def answer_text(rec: Mapping[str, Any], dialect: str) -> str:
    """``<answer>BOX</answer>`` in the dialect, or :data:`NO_TARGET` for a negative."""
    _check(dialect)
    if rec.get("bbox") is None:
        return NO_TARGET
    return f"<answer>{box_text(rec, dialect)}</answer>"


def _problem(expression: str, dialect: str, image_token: str = "") -> str:
    _check(dialect)
    return (f'{image_token}Locate the object that "{expression}" refers to. Think step by step inside '
            f"<think></think>, then give the bounding box inside <answer></answer> {_HELP[dialect]}, "
            f"or {NO_TARGET} if no object in the image matches.")


def _retarget(trace: str, rec: Mapping[str, Any], dialect: str) -> str:
    """A trace with its ``[x1, y1, x2, y2]`` pixel boxes rewritten in the dialect and its answer set from
    the record (so a reviewed fix shows in the answer)."""
    w, h = rec["width"], rec["height"]

    def sub(m: re.Match[str]) -> str:
        box = [float(v) for v in m.groups()]
        if not (box[0] < box[2] and box[1] < box[3]):
            return m.group(0)
        return box_text({"bbox": box, "width": w, "height": h}, dialect)

    think = _ANSWER.sub("", trace)
    if dialect != "pixels":
        think = _LIST4.sub(sub, think)
    return think + answer_text(rec, dialect)


# ------------------------------------------------------------------------------------------------- r1

def r1_question(expression: str, grid: bool) -> str:
    """UniVG-R1's ``question``: the image marker, then the task in the reward's answer form."""
    frame = ("in integers on a 0-1000 grid of the image width and height" if grid
             else "in integer pixels of the image")
    return f'<image>Locate the object that "{expression}" refers to. Give its bounding box as (x1,y1),(x2,y2) {frame}.'


def r1_record(rec: Mapping[str, Any], dialect: str = "grid1000") -> tuple[dict[str, Any] | None, str | None]:
    """UniVG-R1's record of a canonical record, or ``(None, reason)`` when it must be left out (a
    negative; a box thinner than 2 units in the answer frame; a path UniVG-R1 treats as COCO)."""
    _check(dialect)
    if rec.get("bbox") is None:
        return None, "negative_no_target"
    if UNIVG_COCO_MARK in str(rec["image"]):
        return None, "coco_path"
    grid = dialect in GRID_DIALECTS
    x1, y1, x2, y2 = _ints(rec, grid)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None, "thin_box"
    return {"id": rec["sample_id"], "question": r1_question(rec["expression"], grid), "answer": [x1, y1, x2, y2],
            "images": [rec["image"]], "width": int(rec["width"]), "height": int(rec["height"]),
            "expression": rec["expression"]}, None


def open_r1_record(rec: Mapping[str, Any], dialect: str = "pixels") -> dict[str, Any]:
    """The open-r1 layout: ``{id, image, problem, solution, width, height}``, a negative's solution
    :data:`NO_TARGET`."""
    return {"id": rec["sample_id"], "image": rec["image"], "problem": _problem(rec["expression"], dialect),
            "solution": answer_text(rec, dialect), "width": int(rec["width"]), "height": int(rec["height"])}


def write_r1(folder: Path, by_split: Mapping[str, list[dict]], *, all_exprs: Sequence[Mapping] = (),
             category_of: Mapping[str, str] | None = None, categories: Mapping[str, int] | None = None,
             dialect: str = "grid1000") -> dict[str, Any]:
    """``r1/<split>.json`` (UniVG-R1), ``r1/open-r1/<split>.jsonl`` and ``r1/refforge.json``; returns the
    manifest (counts per split, what UniVG-R1's file leaves out and why)."""
    _check(dialect)
    grid = dialect in GRID_DIALECTS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open-r1").mkdir(exist_ok=True)
    manifest: dict[str, Any] = {"layout": "univg-r1", "coords": "grid1000" if grid else "pixels",
                                "dialect": dialect, "counts": {}, "open_r1_counts": {}, "left_out": {}}
    for split, rows in by_split.items():
        kept, why = [], Counter()
        for r in rows:
            out, reason = r1_record(r, dialect)
            if out is None:
                why[reason] += 1
            else:
                kept.append(out)
        atomic_write_bytes(folder / f"{split}.json", _json(kept))
        atomic_write_bytes(folder / "open-r1" / f"{split}.jsonl",
                           b"".join(_json(open_r1_record(r, dialect)) + b"\n" for r in rows))
        manifest["counts"][split] = len(kept)
        manifest["open_r1_counts"][split] = len(rows)
        manifest["left_out"][split] = dict(sorted(why.items()))
    info = {"layout": "univg-r1", "files": "<split>.json", "coords": manifest["coords"], "dialect": dialect,
            "image_root": "..", "run_from": "the export root (image paths are relative to it)",
            "no_target": "left out of <split>.json (UniVG-R1's IoU reward cannot score a rejection); "
                         f"kept in open-r1/<split>.jsonl as {NO_TARGET}",
            "open_r1": "open-r1/<split>.jsonl"}
    atomic_write_bytes(folder / "refforge.json", _json(info, indent=2))
    return manifest


def _meta(root: Path, fmt: str) -> dict[str, Any]:
    with (Path(root) / fmt / "refforge.json").open(encoding="utf-8") as fh:
        return json.load(fh)


def read_r1(root: Path, split: str) -> list[dict[str, Any]]:
    """UniVG-R1's ``r1/<split>.json`` back as partial canonical records (``bbox`` from the integer
    answer: within half a pixel, or half a grid unit, of the exported box)."""
    meta = _meta(root, "r1")
    with (Path(root) / "r1" / f"{split}.json").open(encoding="utf-8") as fh:
        rows = json.load(fh)
    out = []
    for d in rows:
        box = [float(v) for v in d["answer"]]
        if meta.get("coords") == "grid1000":
            box = [float(v) for v in from_grid(box, d["width"], d["height"])]
        m = _PROBLEM.search(d["question"])
        out.append({"sample_id": d["id"], "split": split, "image": d["images"][0],
                    "expression": m.group(1) if m else d.get("expression"), "polarity": "positive", "bbox": box,
                    "width": d["width"], "height": d["height"]})
    return out


def _box_back(text: str, dialect: str, width: float, height: float) -> list[float] | None:
    parsed = parse_answer(_BOX_TOKENS.sub("", text))
    if parsed.status == "rejection":
        return None
    if parsed.status != "box":
        raise ValueError(f"unparseable answer {parsed.raw!r}: {parsed.reason}")
    box = parsed.box
    if dialect in GRID_DIALECTS:
        box = from_grid(box, width, height)
    return [float(v) for v in box]


def read_open_r1(root: Path, split: str) -> list[dict[str, Any]]:
    """The open-r1 layout ``r1/open-r1/<split>.jsonl`` back as partial canonical records."""
    dialect = _meta(root, "r1")["dialect"]
    out = []
    with (Path(root) / "r1" / "open-r1" / f"{split}.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            d = json.loads(line)
            box = _box_back(d["solution"], dialect, d["width"], d["height"])
            m = _PROBLEM.search(d["problem"])
            out.append({"sample_id": d["id"], "split": split, "image": d["image"],
                        "expression": m.group(1) if m else None,
                        "polarity": "negative" if box is None else "positive", "bbox": box,
                        "width": d["width"], "height": d["height"]})
    return out


# ------------------------------------------------------------------------------------------------ sft

def sft_record(rec: Mapping[str, Any], dialect: str = "pixels") -> tuple[dict[str, Any], int]:
    """LLaMA-Factory's ShareGPT record ``{id, messages, images}`` of a canonical record, and how many
    media placeholders had to be escaped in its text."""
    expr, n1 = _escape(str(rec["expression"]))
    user = _problem(expr, dialect, image_token="<image>")
    trace = rec.get("cot")
    if trace:
        trace, n2 = _escape(str(trace))
        assistant = _retarget(trace, rec, dialect)
    else:
        n2 = 0
        assistant = answer_text(rec, dialect)
    return ({"id": rec["sample_id"],
             "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
             "images": [rec["image"]]}, n1 + n2)


def dataset_info(splits: Sequence[str]) -> dict[str, Any]:
    """``dataset_info.json`` registering ``refforge_<split>`` for each split."""
    return {f"refforge_{s}": {
        "file_name": f"{s}.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    } for s in splits}


def write_sft(folder: Path, by_split: Mapping[str, list[dict]], *, all_exprs: Sequence[Mapping] = (),
              category_of: Mapping[str, str] | None = None, categories: Mapping[str, int] | None = None,
              dialect: str = "pixels") -> dict[str, Any]:
    """``sft/<split>.json``, ``sft/dataset_info.json`` and ``sft/refforge.json``; every sample is written
    (a negative's answer is :data:`NO_TARGET`); returns the manifest."""
    _check(dialect)
    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"dialect": dialect, "counts": {}, "negatives": {}, "with_trace": {},
                                "placeholders_escaped": {}, "left_out": {}}
    for split, rows in by_split.items():
        recs, escaped = [], 0
        for r in rows:
            d, n = sft_record(r, dialect)
            recs.append(d)
            escaped += n
        atomic_write_bytes(folder / f"{split}.json", _json(recs))
        manifest["counts"][split] = len(recs)
        manifest["negatives"][split] = sum(1 for r in rows if r.get("bbox") is None)
        manifest["with_trace"][split] = sum(1 for r in rows if r.get("cot"))
        manifest["placeholders_escaped"][split] = escaped
        manifest["left_out"][split] = 0
    atomic_write_bytes(folder / "dataset_info.json", _json(dataset_info(list(by_split)), indent=2))
    atomic_write_bytes(folder / "refforge.json", _json(
        {"dialect": dialect, "image_root": "..", "llamafactory": {"dataset_dir": "<export>/sft",
                                                                  "media_dir": "<export>"},
         "no_target": NO_TARGET}, indent=2))
    return manifest


def read_sft(root: Path, split: str) -> list[dict[str, Any]]:
    """``sft/<split>.json`` back as partial canonical records (needs the images for their sizes when the
    dialect is on the 0-1000 grid)."""
    dialect = _meta(root, "sft")["dialect"]
    with (Path(root) / "sft" / f"{split}.json").open(encoding="utf-8") as fh:
        rows = json.load(fh)
    out = []
    for d in rows:
        w = h = 1.0
        if dialect in GRID_DIALECTS:
            from PIL import Image

            with Image.open(Path(root) / d["images"][0]) as im:
                w, h = im.size
        user, assistant = d["messages"][0]["content"], d["messages"][1]["content"]
        box = _box_back(assistant, dialect, w, h)
        m = _PROBLEM.search(user)
        out.append({"sample_id": d["id"], "split": split, "image": d["images"][0],
                    "expression": m.group(1) if m else None,
                    "polarity": "negative" if box is None else "positive", "bbox": box})
    return out
