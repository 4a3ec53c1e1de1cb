"""proposals: objects for images without (complete) scene graphs: tagger -> detector -> NMS rule.

Writes ``objects`` (origin "detector", with scores) and, from their boxes, geometric ``relations``.
Models load once per process and config (:meth:`BuildContext.cached`), not per shard.

Modules: :mod:`.detectors` (taggers, detectors, :func:`~.detectors.propose`), :mod:`.nms` (the rule).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from PIL import Image as PILImage
from pydantic import Field, model_validator

from refforge._strict import _Strict
from refforge.pipeline.stage import Stage, UnitOutput
from refforge.schemas import Drop, Object, Relation
from refforge.stages.ingest import FolderSource
from refforge.stages.ingest.scenes import graph_records
from refforge.stages.scene.geometry import compute_relations
from refforge.stages.scene.graph import GObject, SceneGraph

from .detectors import ProposalParams, make_detector, make_tagger, propose


class ProposalsConfig(_Strict):
    """Object proposals for images without complete scene graphs: tagger -> detector -> NMS rule.
    The fields from ``box_threshold`` on are :class:`~.detectors.ProposalParams`."""

    detector: Literal["offline", "grounding_dino"] = "offline"
    detector_model: str | None = None
    tagger: Literal["none", "vocabulary", "open_clip"] = "none"
    tagger_model: str | None = None
    tagger_pretrained: str | None = None
    vocabulary: list[str] | None = None
    all_images: bool = False
    device: str = "cpu"
    batch_size: int = Field(default=4, ge=1, le=1024)
    box_threshold: float = Field(default=0.35, ge=0, le=1)
    text_threshold: float = Field(default=0.25, ge=0, le=1)
    max_tags: int = Field(default=20, ge=1, le=1000)
    tag_threshold: float = Field(default=0.0, ge=0, le=1)
    nms_iou: float = Field(default=0.5, ge=0, le=1)
    nms_ios: float = Field(default=0.8, ge=0, le=1)
    min_area_frac: float = Field(default=0.001, ge=0, le=1)
    max_area_frac: float = Field(default=0.95, gt=0, le=1)
    max_per_image: int = Field(default=50, ge=1, le=1000)
    class_agnostic: bool = False
    relations_from_geometry: bool = True

    @model_validator(mode="after")
    def _models(self):
        if self.min_area_frac >= self.max_area_frac:
            raise ValueError(f"min_area_frac ({self.min_area_frac}) must be below max_area_frac "
                             f"({self.max_area_frac}): every proposal would be dropped")
        if self.detector == "grounding_dino" and not self.detector_model:
            raise ValueError("detector = 'grounding_dino' needs detector_model (a local path or a hub id)")
        if self.tagger == "open_clip" and not self.tagger_model:
            raise ValueError("tagger = 'open_clip' needs tagger_model (an open_clip model name)")
        if self.tagger in ("vocabulary", "open_clip") and not self.vocabulary:
            raise ValueError(f"tagger = {self.tagger!r} needs a vocabulary (a list of category names)")
        if self.detector == "grounding_dino" and self.tagger == "none" and not self.vocabulary:
            raise ValueError("detector = 'grounding_dino' needs words to look for: a tagger or a vocabulary")
        return self


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def model_problem(field: str, value: str | None, *, folder: bool) -> str | None:
    """Why a model setting cannot load, in one line, or None. A value that looks like a path (it starts
    with '.', '/' or '~', or has more than one '/', or exists) must exist: a folder with a
    ``config.json`` for a transformers model (``folder``), a file for an open_clip checkpoint. A hub id
    (``org/name``) must be in the local hub cache when the hub is off (``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set); online it is left to the download. An open_clip tag
    (``laion2b_s34b_b79k``) is open_clip's to resolve."""
    if not value:
        return None
    path = Path(value).expanduser()
    looks_local = value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1 or path.exists()
    if looks_local:
        if not path.exists():
            return f"{field}: {value} does not exist (a local model {'folder' if folder else 'file'})"
        if folder and not (path / "config.json").is_file():
            return f"{field}: {value} is not a model folder (no config.json in it)"
        if not folder and not path.is_file():
            return f"{field}: {value} is not a checkpoint file"
        return None
    if folder and not _HUB_ID.match(value):
        return f"{field}: {value!r} is neither a local folder nor a hub id like 'IDEA-Research/grounding-dino-tiny'"
    offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE)
    if folder and offline and not (_hub_cache() / f"models--{value.replace('/', '--')}").is_dir():
        return (f"{field}: {value} is not a local folder, and the hub is off ({'/'.join(_OFFLINE)}) with no copy "
                f"in {_hub_cache()}: give the folder of a downloaded model")
    return None


def load_models(p: ProposalsConfig) -> tuple[Any, Any]:
    """(tagger, detector) of a ``[proposals]`` section."""
    topts: dict[str, Any] = {}
    if p.tagger == "vocabulary":
        topts = {"vocabulary": p.vocabulary}
    elif p.tagger == "open_clip":
        topts = {"vocabulary": p.vocabulary, "model": p.tagger_model, "pretrained": p.tagger_pretrained,
                 "device": p.device}
    dopts: dict[str, Any] = {}
    if p.detector == "grounding_dino":
        dopts = {"model": p.detector_model, "device": p.device, "box_threshold": p.box_threshold,
                 "text_threshold": p.text_threshold, "batch_size": p.batch_size}
    return make_tagger(p.tagger, **topts), make_detector(p.detector, **dopts)


class ProposalsStage(Stage):
    name = "proposals"
    version = 2
    config = ProposalsConfig
    requires = ("ingest",)
    reads = ("images", "objects")
    writes = ("objects", "relations")
    key_inputs = ("ingest",)
    joins = "graph"
    core = False
    default = False

    def auto(self, cfg: Any) -> bool:
        """A folder source (no objects) or ``all_images`` needs proposals."""
        return isinstance(cfg.source, FolderSource) or cfg.proposals.all_images

    def preflight(self, cfg: Any) -> list[str]:
        """The models the backends will load, checked before anything is written (a mistyped path is one
        line here, not a traceback after the ingest): see :func:`model_problem`."""
        p = cfg.proposals
        out = []
        if p.detector == "grounding_dino":
            out.append(model_problem("proposals.detector_model", p.detector_model, folder=True))
        if p.tagger == "open_clip" and p.tagger_pretrained:
            out.append(model_problem("proposals.tagger_pretrained", p.tagger_pretrained, folder=False))
        return [x for x in out if x]

    def needed_packages(self, section: ProposalsConfig) -> list[tuple[str, str]]:
        out = []
        if section.detector == "grounding_dino":
            out += [("torch", "models"), ("transformers", "models")]
        if section.tagger == "open_clip":
            out += [("torch", "models"), ("open_clip", "models")]
        return list(dict.fromkeys(out))

    def run(self, ctx, section: ProposalsConfig, inputs) -> UnitOutput:
        """Detector objects for the shard's images without a scene graph (every image with
        ``all_images``); relations between them computed from their boxes (``relations_from_geometry``)."""
        p, b = section, ctx.build
        images = b.reader.read("images", [inputs["ingest"]]).to_pylist()
        with_objects = set(b.reader.read("objects", [inputs["ingest"]], columns=["image_id"]).column(0).to_pylist())
        todo = [r for r in images if p.all_images or r["image_id"] not in with_objects]
        out = UnitOutput(items_in=len(todo))
        if not todo:
            return out
        key = "proposals:" + json.dumps(p.model_dump(mode="json"), sort_keys=True)
        tagger, detector = ctx.cached(key, lambda: load_models(p))
        params = ProposalParams(**{f.name: getattr(p, f.name) for f in fields(ProposalParams)})
        objects: list[Object] = []
        relations: list[Relation] = []
        for start in range(0, len(todo), p.batch_size):
            batch = todo[start:start + p.batch_size]
            pils = []
            for r in batch:
                with PILImage.open(b.images.resolve(r["path"])) as im:
                    pils.append(im.convert("RGB"))
            found = propose(pils, tagger, detector, params, vocabulary=p.vocabulary)
            for r, props in zip(batch, found, strict=True):
                if not props:
                    out.drops.append(Drop(stage="proposals", key=r["image_id"], reason="no_proposals",
                                          detail=r["source_ref"]))
                    continue
                gobjs = [GObject(f"det{i}", q.name, tuple(q.box), (), q.origin, q.score) for i, q in enumerate(props)]
                objs, _, drops = graph_records(r["image_id"], SceneGraph(r["width"], r["height"], gobjs),
                                               f"proposals:{r['image_id']}")
                out.drops += [d.model_copy(update={"stage": "proposals"}) for d in drops]
                objects += objs
                if p.relations_from_geometry:
                    kept = {o.object_id for o in objs}
                    relations += [Relation(image_id=r["image_id"], subject_id=g.subject, predicate=g.predicate,
                                           object_id=g.object)
                                  for g in compute_relations([g for g in gobjs if g.id in kept], r["width"],
                                                             r["height"])]
        out.tables = {"objects": objects, "relations": relations}
        out.extra = {"images": len(todo), "proposals": len(objects)}
        return out

    def model_ids(self, ctx, section: ProposalsConfig) -> dict[str, str]:
        p = section
        return {"proposals": f"detector={p.detector_model or p.detector}, tagger={p.tagger_model or p.tagger}"}


STAGE = ProposalsStage()

__all__ = ["STAGE", "ProposalsConfig", "ProposalsStage", "load_models"]
