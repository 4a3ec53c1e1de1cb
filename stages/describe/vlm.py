"""The VLM side of describe: Set-of-Mark marks and crops, the describe prompt, and the grounding round
trip (:class:`VLMGrounder`, also what ``refforge eval``-style grounding reads back)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from refforge.llm import ChatRequest, ChatResult, LLMClient, LLMOutputError
from refforge.schemas import Drop
from refforge.stages.answers import parse_answer
from refforge.stages.llm_common import Box, _drop, _macros, _messages, _model_of, prompt_version
from refforge.stages.rewrite import _clean_expression
from refforge.stages.scene.boxes import iou

# ========================================================================================= grounding


class VLMGrounder:
    """``grounder(image, text) -> box | None``: a VLM grounding call through the client.

    Asks (``prompts/llm/ground.j2``) for ``{"bbox_2d": [x1, y1, x2, y2]}`` in the sent image's pixels
    (``dialect="pixels"``) or on the 0-1000 grid (``"grid1000"``), parses it with
    :func:`refforge.stages.answers.parse_answer`
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
        p = parse_answer(res.text, dialect=self.dialect, width=enc.original_width, height=enc.original_height,
                         sent_size=(enc.width, enc.height))
        return p.box if p.status == "box" else None

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
    "round trip low IoU" (the IoU in the detail), "round trip <client reason>", "bad proposal box". Drop keys:
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
                                            _drop(stage, key, "round trip low IoU",
                                                  f"IoU {score:.2f} < {iou_threshold:g}: {text}"), pv, model, gb, score, gv)
            else:
                out[slot] = DescribeOutcome(box_id, c, box, text, None, pv, model, gb, score, gv)
    return out


