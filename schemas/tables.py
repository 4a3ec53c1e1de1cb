"""Every table of a build, defined once as a pydantic model.

The Arrow schema of each table, the column checks on write and the DuckDB views are all derived
from these classes (see :mod:`refforge.schemas._arrow` and :data:`TABLES`).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ._arrow import BOX_MARKER, field_is_box

SCHEMA_VERSION = "1"

Box = Annotated[tuple[float, float, float, float], BOX_MARKER]
"""(x1, y1, x2, y2) in pixels of the stored image; x1 < x2, y1 < y2, inside the image."""
# a dict field is an Arrow map column, which reads back as a list of (key, value) pairs: accept those
StrMap = Annotated[dict[str, str], BeforeValidator(lambda v: dict(v) if isinstance(v, list) else v)]


def check_box(box: tuple[float, float, float, float], size: tuple[int, int] | None = None,
              tol: float = 1e-6) -> tuple[float, float, float, float]:
    """Validate the box invariants; ``size`` = (width, height) adds the inside-the-image check.

    >>> check_box((1, 2, 3, 4), (10, 10))
    (1.0, 2.0, 3.0, 4.0)
    >>> check_box((3, 2, 1, 4))
    Traceback (most recent call last):
    ...
    ValueError: box (3.0, 2.0, 1.0, 4.0) has x1 >= x2 (zero or negative width)
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    b = (x1, y1, x2, y2)
    if any(v != v for v in b):
        raise ValueError(f"box {b} has NaN coordinates")
    if not x1 < x2:
        raise ValueError(f"box {b} has x1 >= x2 (zero or negative width)")
    if not y1 < y2:
        raise ValueError(f"box {b} has y1 >= y2 (zero or negative height)")
    if x1 < -tol or y1 < -tol:
        raise ValueError(f"box {b} starts outside the image (negative coordinate)")
    if size is not None:
        w, h = size
        if x2 > w + tol or y2 > h + tol:
            raise ValueError(f"box {b} ends outside the {w}x{h} image")
    return b


class Record(BaseModel):
    """Base of every table row: strict about unknown fields, boxes checked on construction.

    Pass ``context={"image_size": (width, height)}`` to ``model_validate`` to also check that
    every box lies inside the image.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _boxes(cls, value, info: ValidationInfo):
        field = cls.model_fields[info.field_name]
        if value is not None and field_is_box(field):
            size = (info.context or {}).get("image_size")
            return check_box(value, size)
        return value


class Edit(BaseModel):
    """How a derived image was made from its parent. ``type``: ``flip``, ``remove``, ``replace_category``,
    ``change_attribute``. The fields after ``prompt`` come with the inpainting edits (a build from before
    them reads them as null)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str
    object_id: str | None = None
    box: Box | None = None
    prompt: str | None = None
    word: str | None = Field(default=None, description="the replacement word (a category or an attribute value)")
    attribute: str | None = Field(default=None, description="change_attribute: the value replaced")
    mask: str | None = Field(default=None, description="the mask (PNG, white = may change), relative to the build root")
    seed: int | None = None
    model: str | None = Field(default=None, description="what made the pixels (a model id, or the algorithm)")
    group: str | None = Field(default=None, description="the edit: candidates of one edit share it")
    candidate: int | None = Field(default=None, description="the candidate's index within its edit (0..N-1)")


class Image(Record):
    image_id: str = Field(description="sha256 of the stored bytes")
    source: str
    path: str = Field(description="relative to the build root")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    parent_image_id: str | None = None
    edit: Edit | None = None
    source_ref: str | None = Field(default=None, description="the source's file name (or the synthetic scene)")
    source_ids: list[str] = Field(default_factory=list, description=(
        "the source's own image ids (GQA image id, COCO image id); more than one where the source holds "
        "these bytes under several ids"))
    spec: str | None = Field(default=None, description="JSON the source needs to re-render the image")


class Object(Record):
    image_id: str
    object_id: str
    name: str = Field(min_length=1)
    attributes: list[str] = Field(default_factory=list)
    box: Box
    origin: Literal["scene_graph", "detector", "tagger"] = "scene_graph"
    score: float | None = None


class Relation(Record):
    image_id: str
    subject_id: str
    predicate: str = Field(min_length=1)
    object_id: str


class Expression(Record):
    sample_id: str
    image_id: str
    text: str = Field(min_length=1)
    template_text: str | None = None
    template_name: str | None = None
    polarity: Literal["positive", "negative"]
    target_object_id: str | None = None
    gt_box: Box | None = None
    task: str | None = Field(default=None, description="the task in the build's primary taxonomy")
    tasks: StrMap = Field(default_factory=dict, description="taxonomy -> task, for every taxonomy")
    difficulty: Literal[1, 2, 3]
    hops: int | None = None
    path: str | None = Field(default=None, description="JSON of the referring path")
    negative_type: str | None = None
    negative_level: str | None = None
    negative_source: Literal["text", "image"] | None = None
    positive_id: str | None = None
    needs_review: bool = False

    @model_validator(mode="after")
    def _polarity(self):
        if self.polarity == "positive" and (self.gt_box is None or self.target_object_id is None):
            raise ValueError("a positive expression needs target_object_id and gt_box")
        if self.polarity == "negative":
            if self.gt_box is not None:
                raise ValueError("a negative expression refers to nothing: gt_box must be null")
            if self.negative_type is None:
                raise ValueError("a negative expression needs negative_type")
        return self

    @staticmethod
    def arrow_rules(t):
        """The polarity rule of ``_polarity``, vectorised for Arrow batches on write."""
        import pyarrow.compute as pc

        pos = pc.equal(t["polarity"], "positive")
        return [
            (pc.and_(pos, pc.or_(pc.is_null(t["gt_box"]), pc.is_null(t["target_object_id"]))),
             "a positive expression needs target_object_id and gt_box"),
            (pc.and_(pc.invert(pos), pc.is_valid(t["gt_box"])),
             "a negative expression refers to nothing: gt_box must be null"),
            (pc.and_(pc.invert(pos), pc.is_null(t["negative_type"])), "a negative expression needs negative_type"),
        ]


class CotTrace(Record):
    sample_id: str
    trace: str
    answer_box: Box | None = None
    iou: float | None = None
    verdict: str
    selected: bool = False
    model: str


class Score(Record):
    """A filter's measurement of a sample (``subject_id`` = sample_id) or of an image (= image_id).
    Scores never delete anything: exports choose by ``passed``. ``threshold`` and ``detail`` came with
    the image filters (a build from before them reads them as null)."""

    subject_id: str
    filter: str
    value: float
    passed: bool
    threshold: float | None = None
    detail: str | None = Field(default=None, description="what was compared (JSON), for the report")


class Review(Record):
    """One annotator's decision on a sample; ``time`` orders decisions (the latest counts). The fields
    after ``time`` come from a Label Studio pull (a build from before them reads them as null)."""

    sample_id: str
    annotator: str
    decision: Literal["accept", "reject", "fix"]
    fixed_box: Box | None = None
    fixed_text: str | None = None
    task_id: str | None = None
    time: dt.datetime
    created: dt.datetime | None = Field(default=None, description="when the annotation was first submitted")
    updated: dt.datetime | None = Field(default=None, description="when it was last changed")
    lead_time_s: float | None = Field(default=None, description="seconds the annotator spent on it")
    project: str | None = Field(default=None, description="the Label Studio project it came from")
    annotation_id: str | None = Field(default=None, description="the annotation's id in that project")


class ReviewBatch(Record):
    """A sample sent to a Label Studio project: written only once the server accepted its batch."""

    project: str
    project_id: int
    task_id: str
    sample_id: str
    strategy: str
    batch_id: str
    time: dt.datetime
    overlap: int | None = Field(default=None, description="annotators per task asked for")
    url: str | None = Field(default=None, description="the server's URL (never a token)")


class Drop(Record):
    """Why something was left out. ``reason`` is a category (a slug: ``no_usable_trace``,
    ``too_small``), one of a small set per stage, so the report can count them; values (an IoU, an
    area fraction, the model's text) go in ``detail``. A reason given as words is stored as its slug."""

    stage: str
    key: str
    reason: str
    detail: str | None = None

    @field_validator("reason")
    @classmethod
    def _slug(cls, v: str) -> str:
        return reason_slug(v)


def reason_slug(text: str) -> str:
    """``"round trip found nothing"`` -> ``"round_trip_found_nothing"``: lower case, runs of anything
    but letters and digits as one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_") or "unspecified"


class Split(Record):
    sample_id: str
    split: str
    export_id: str


TABLES: dict[str, type[Record]] = {
    "images": Image,
    "objects": Object,
    "relations": Relation,
    "expressions": Expression,
    "cot_traces": CotTrace,
    "scores": Score,
    "reviews": Review,
    "review_batches": ReviewBatch,
    "negative_candidates": Expression,
    "drops": Drop,
    "splits": Split,
}

# The fields that identify a row: a re-run that produces the same key produces the same row.
KEYS: dict[str, tuple[str, ...]] = {
    "images": ("image_id",),
    "objects": ("image_id", "object_id"),
    "relations": ("image_id", "subject_id", "predicate", "object_id"),
    "expressions": ("sample_id",),
    "cot_traces": ("sample_id", "model", "trace"),
    "scores": ("subject_id", "filter"),
    "reviews": ("sample_id", "annotator", "time"),
    "review_batches": ("project", "project_id", "sample_id"),
    "negative_candidates": ("sample_id",),
    "drops": ("stage", "key", "reason", "detail"),
    "splits": ("export_id", "sample_id"),
}
