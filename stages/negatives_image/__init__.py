"""negatives_image: edited images that a positive's expression no longer refers to.

Two families of edits:

* the horizontal flip (:mod:`.flip`). A positive whose path holds a left/right word is a negative on
  the mirrored image when, on the mirrored scene graph, the path refers to nothing; the mirrored
  image, its graph and the negative expressions are written. The negative is certain only when box
  geometry agrees (:func:`.flip.verify_flip`); otherwise it is written with ``needs_review = true``
  and the reason in its path JSON (``"review_reason"``, ``"review_detail"``). Real sources (every
  source but ``synthetic``) are also checked with the loose, centre-based reading of
  left/right/above/below.
* object edits (``edits``: ``remove``, ``replace_category``, ``change_attribute``), of a positive's
  target (L1) or of a context object of its path (L2), planned and verified on the scene graph first
  (:mod:`.edits`: the path must refer to nothing on the edited graph), then made in pixels by the
  ``inpainter``: ``synthetic`` re-renders the edited scene (exact: the edit is certain), ``offline``
  inpaints with OpenCV (Telea / Navier-Stokes removal, HSV recolour), ``diffusers`` runs any
  inpainting pipeline (N candidates per edit, seeded, the unmasked area composited back); see
  :mod:`.inpaint`. Each candidate is a derived image (``parent_image_id``; ``edit``: type, object,
  box, mask, prompt, word, seed, model, group, candidate) with its edited scene graph, and every
  positive the edit negates becomes a negative on it (``negative_source = "image"``, negative_type
  ``inpaint_remove`` / ``inpaint_object`` / ``inpaint_attribute``). Pixels a model made cannot be
  known to show the edit: those negatives carry ``needs_review = true`` until a filter (the
  ``filters`` stage) or a reviewer passes them.

On a synthetic source every model-made edit is also measured against the re-rendered scene (exact
ground truth): the mean error inside the mask and the change outside it, per inpainter, in the run
file's ``fidelity`` line (``fidelity_backends`` measures other inpainters on the same edits without
writing their images). The run file's ``negatives_image`` line counts ``flips`` (certain,
needs_review), ``review_reasons``, ``edits`` (kind/level -> negatives) and ``edit_refusals``.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image as PILImage
from pydantic import Field, model_validator

from refforge._strict import _Strict
from refforge.llm.endpoint import require_endpoint
from refforge.pipeline.devices import device_slot
from refforge.pipeline.inputs import graph_keys, read_graphs
from refforge.pipeline.stage import Stage, UnitOutput, merge_counts
from refforge.schemas import Drop, Edit, Expression, Image, Record
from refforge.stages.ingest import Source, SyntheticSource
from refforge.stages.ingest import synthetic as syn
from refforge.stages.ingest.scenes import graph_records
from refforge.stages.negatives_text.llm_backend import negative_backend
from refforge.stages.negatives_text.plausible import BuildVocabulary, VocabularyBackend
from refforge.stages.paths import PathsConfig
from refforge.stages.scene.keys import stable_key
from refforge.stages.scene.query import Node
from refforge.stages.scene.taxonomy import tasks_for

from . import edits as E
from .flip import FlipChecker, horizontal_level, mirrored_image
from .inpaint import EditRequest, box_mask, fidelity, make_inpainter

InpainterKind = Literal["synthetic", "offline", "diffusers"]


class NegativesImageConfig(_Strict):
    flip: bool = True
    edits: list[Literal["remove", "replace_category", "change_attribute"]] = Field(
        default_factory=list, description="object edits to make besides flips (none by default)")
    levels: list[Literal["L1", "L2"]] = Field(default_factory=lambda: ["L1", "L2"],
                                              description="edit the target (L1) and/or a context object (L2)")
    per_image: int = Field(default=2, ge=1, le=64, description="edits per image at most")
    inpainter: Literal["auto", "synthetic", "offline", "diffusers"] = Field(
        default="auto", description="auto: synthetic for the synthetic source, offline otherwise")
    model: str | None = Field(default=None, description="diffusers: an inpainting pipeline (local path or hub id)")
    candidates: int | None = Field(default=None, ge=1, le=64,
                                   description="candidates per edit (diffusers; default 10); 1 for the others")
    steps: int = Field(default=20, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0)
    strength: float = Field(default=1.0, gt=0, le=1)
    size: int = Field(default=512, ge=64, le=4096, description="diffusers: the working size (longer side)")
    prompt_style: Literal["plain", "powerpaint"] = "plain"
    mask_margin: int = Field(default=8, ge=0, le=256, description="pixels the box mask is dilated by")
    offline_method: Literal["telea", "ns"] = "telea"
    device: str = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    batch_size: int = Field(default=4, ge=1, le=256, description="edits per model call")
    words: Literal["vocabulary", "llm"] = Field(
        default="vocabulary", description="replacement words: the build's vocabulary, or the [llm] endpoint")
    fidelity_backends: list[Literal["offline", "diffusers"]] = Field(
        default_factory=list, description="synthetic source: also measure these inpainters on the same edits")

    @model_validator(mode="after")
    def _check(self):
        if self.edits and not self.levels:
            raise ValueError("negatives_image.levels is empty: edits need L1 and/or L2")
        if "diffusers" in (self.inpainter, *self.fidelity_backends) and not self.model:
            raise ValueError("negatives_image.inpainter = 'diffusers' needs model (a local path or a hub id)")
        if self.candidates not in (None, 1) and self.inpainter in ("synthetic", "offline"):
            raise ValueError(f"inpainter {self.inpainter!r} makes one candidate per edit; candidates must be 1")
        return self

    def check_against(self, cfg: Any) -> None:
        if self.edits and self.inpainter == "synthetic" and not isinstance(cfg.source, SyntheticSource):
            raise ValueError(f"negatives_image.inpainter = 'synthetic' re-renders synthetic scenes; the source is "
                             f"{cfg.source.kind!r}: use 'offline' or 'diffusers'")
        if self.edits and self.words == "llm":
            require_endpoint(cfg, "llm", "negatives_image.words = 'llm'")

    def hash_data(self, data: dict[str, Any]) -> dict[str, Any]:
        """What of this section enters hashes: only ``flip`` while no edit is asked for (so flip-only
        builds from before the edits keep their identity)."""
        return data if self.edits else {"flip": data["flip"]}

    def inpainter_for(self, source: Any) -> str:
        if self.inpainter != "auto":
            return self.inpainter
        return "synthetic" if isinstance(source, SyntheticSource) else "offline"

    def inpainter_opts(self, kind: str) -> dict[str, Any]:
        if kind == "offline":
            return {"method": self.offline_method, "margin": self.mask_margin}
        return {"model": self.model, "device": self.device, "dtype": self.dtype,
                "candidates": self.candidates or 10, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "strength": self.strength, "margin": self.mask_margin, "batch_size": self.batch_size,
                "size": self.size, "prompt_style": self.prompt_style}


class NegativesImageStage(Stage):
    name = "negatives_image"
    version = 2  # 2: flips verified by box geometry too (needs_review where it disagrees); drop reason slugs
    config = NegativesImageConfig
    uses: ClassVar[dict[str, Any]] = {"paths": PathsConfig, "source": Source}
    endpoints = ("llm",)
    requires = ("paths",)
    reads = ("images", "objects", "relations", "expressions")
    writes = ("images", "objects", "relations", "expressions")
    key_inputs = ("paths",)
    core = True
    default = True

    def needed_packages(self, section: NegativesImageConfig) -> list[tuple[str, str]]:
        out = list(self.packages)  # OpenCV (the offline inpainter) is a core dependency
        if section.edits and "diffusers" in (section.inpainter, *section.fidelity_backends):
            out += [("torch", "models"), ("diffusers", "models")]
        return out

    def model_ids(self, ctx, section: NegativesImageConfig) -> dict[str, str]:
        if not section.edits:
            return {}
        kind = section.inpainter_for(ctx.section("source"))
        out = {"inpainter": section.model if kind == "diffusers" else kind}
        if section.words == "llm":
            llm = ctx.endpoint("llm")
            out["negatives_image.words"] = llm.model if llm else "offline-build-vocabulary"
        return out

    def prompts(self, ctx, section: NegativesImageConfig) -> tuple[str, ...]:
        return ("negatives",) if section.edits and section.words == "llm" else ()

    def run(self, ctx, section: NegativesImageConfig, inputs) -> UnitOutput:
        out = UnitOutput()
        if not section.flip and not section.edits:
            return out
        b = ctx.build
        graphs, images = read_graphs(b, graph_keys(inputs))
        positives = b.reader.read("expressions", [inputs["paths"]]).to_pylist()
        out.items_in = len(positives)
        rows: dict[str, list[Record]] = {"images": [], "objects": [], "relations": [], "expressions": []}
        if section.flip:
            self._flips(ctx, positives, graphs, images, rows, out)
        if section.edits:
            _EditRun(ctx, section, graphs, images, rows, out).run(positives)
        out.tables = rows
        return out

    def _flips(self, ctx, positives, graphs, images, rows, out: UnitOutput) -> None:
        b = ctx.build
        by_image: dict[str, list[tuple[dict, Node, str]]] = defaultdict(list)
        for pos in positives:
            query = Node.from_json(json.loads(pos["path"]))
            level = horizontal_level(query)
            if level is not None:
                by_image[pos["image_id"]].append((pos, query, level))
        stage_hash = ctx.stage_hash
        taxonomy = ctx.section("paths").taxonomy
        # synthetic relations follow refforge's geometry rules exactly; real sources annotate by eye
        loose = not isinstance(ctx.section("source"), SyntheticSource)
        verdicts: Counter = Counter()
        reasons: Counter = Counter()
        for image_id, items in by_image.items():
            img = images[image_id]
            data, ext, mgraph, mspec = mirrored_image(b.images.read(img["path"]), img["source"], img["spec"],
                                                      graphs[image_id])
            checker = FlipChecker(mgraph, loose=loose)
            negs = []
            for pos, q, lvl in items:
                v = checker.verify(q)
                if not v.negative:
                    out.drops.append(Drop(stage="negatives_image", key=pos["sample_id"], reason=v.reason or "",
                                          detail=v.detail))
                    continue
                negs.append((pos, q, lvl, v))
                verdicts["needs_review" if v.needs_review else "certain"] += 1
                if v.reason:
                    reasons[v.reason] += 1
            if not negs:
                continue
            mid, rel = b.images.put(data, ext)
            rows["images"].append(Image(image_id=mid, source=img["source"], path=rel,
                                        width=img["width"], height=img["height"], parent_image_id=image_id,
                                        edit=Edit(type="flip"), source_ref=img["source_ref"], spec=mspec))
            objs, rels, drops = graph_records(mid, mgraph, f"flip:{image_id}")
            rows["objects"] += objs
            rows["relations"] += rels
            out.drops += drops
            for pos, q, lvl, v in negs:
                tasks = tasks_for(q, mgraph, polarity="negative", negative_type="flip")
                path = pos["path"]
                if v.needs_review:
                    path = json.dumps({**json.loads(path), "review_reason": v.reason, "review_detail": v.detail},
                                      sort_keys=True)
                rows["expressions"].append(Expression(
                    sample_id=stable_key("flip", pos["sample_id"], mid, stage_hash), image_id=mid, text=pos["text"],
                    template_text=pos["template_text"], template_name=pos["template_name"], polarity="negative",
                    task=tasks.get(taxonomy), tasks=tasks, difficulty=pos["difficulty"], hops=pos["hops"],
                    path=path, negative_type="flip", negative_level=lvl, negative_source="image",
                    positive_id=pos["sample_id"], needs_review=v.needs_review))
        out.extra.update({"flips": dict(verdicts), "review_reasons": dict(reasons)})

    def summary(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        flips = merge_counts(extras, "flips")
        out: dict[str, Any] = {
            "flips": {"certain": flips.get("certain", 0), "needs_review": flips.get("needs_review", 0)},
            "review_reasons": merge_counts(extras, "review_reasons")}
        if any("edits" in e for e in extras):
            out["edits"] = merge_counts(extras, "edits")
            out["edit_refusals"] = merge_counts(extras, "edit_refusals")
            out["edit_images"] = sum(e.get("edit_images", 0) for e in extras)
            fid: dict[str, dict[str, float]] = {}
            for e in extras:
                for backend, m in e.get("fidelity", {}).items():
                    acc = fid.setdefault(backend, {})
                    for k, v in m.items():
                        acc[k] = acc.get(k, 0.0) + v
            out["fidelity"] = {k: {"edits": int(m["n"]), **{f: round(m[f] / m["n"], 6) for f in sorted(m) if f != "n"}}
                               for k, m in sorted(fid.items()) if m.get("n")}
            warnings = []
            asked = dict.fromkeys(k for e in extras for k in e.get("edits_asked", ()))
            made = Counter()
            for key, n in out["edits"].items():
                made[key.split("/")[0]] += n
            refusals = ", ".join(f"{r} {n}" for r, n in Counter(out["edit_refusals"]).most_common(3)) or "none"
            for kind in asked:
                if not made.get(kind):
                    warnings.append(f"negatives_image: no negative was made by the {kind!r} edit "
                                    f"(refusals: {refusals}); check the inpainter supports it")
            if warnings:
                out["warnings"] = warnings
        return out


def _png(img: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1, optimize=False)
    return buf.getvalue()


def _mask_png(mask: np.ndarray) -> bytes:
    return _png(PILImage.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L"))


class _EditRun:
    """The object edits of one unit: plan and verify on the graphs, make the pixels, write the rows."""

    def __init__(self, ctx, section: NegativesImageConfig, graphs, images, rows, out: UnitOutput):
        self.ctx, self.section, self.graphs, self.images, self.rows, self.out = ctx, section, graphs, images, rows, out
        self.source = ctx.section("source")
        self.kind = section.inpainter_for(self.source)
        self.synthetic_source = isinstance(self.source, SyntheticSource)
        vocabulary = BuildVocabulary(graphs.values())
        backend: Any = VocabularyBackend(vocabulary)
        if section.words == "llm":
            backend = negative_backend(ctx.client("llm"), fallback=backend, vocabulary=vocabulary)
        self.backend = backend
        self.inpainter = None if self.kind == "synthetic" else self._inpainter(self.kind)
        self.samples: set[str] = set()
        self.counts: Counter = Counter()
        self.refusals: Counter = Counter()
        self.fidelity: dict[str, Counter] = defaultdict(Counter)
        self.written: set[str] = set()
        self.n_images = 0
        self._truths: dict[tuple[str, str], PILImage.Image] = {}
        self._originals: dict[str, PILImage.Image] = {}
        self._pool: ThreadPoolExecutor | None = None

    def _encoder(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                            thread_name_prefix="refforge-png")
        return self._pool

    def _truth(self, image_id: str, p: E.PlannedEdit) -> PILImage.Image:
        """The synthetic scene re-rendered after the edit (once per edit)."""
        key = (image_id, p.edit.key)
        if key not in self._truths:
            self._truths[key] = syn.render(p.graph, p.spec)
        return self._truths[key]

    def _inpainter(self, kind: str):
        opts = self.section.inpainter_opts(kind)
        return self.ctx.cached(f"inpainter:{kind}:{json.dumps(opts, sort_keys=True)}",
                               lambda: make_inpainter(kind, **opts))

    def _exact(self, image_id: str) -> bool:
        """The image's graph is exactly its synthetic scene (no detector objects merged in), so the
        renderer can re-draw it after an edit."""
        img = self.images[image_id]
        return bool(self.synthetic_source and img.get("spec")) and all(
            o.origin == "scene_graph" for o in self.graphs[image_id].objects)

    def _kind_for(self, image_id: str) -> str:
        """Who makes this image's pixels: the renderer for an exact synthetic scene; else the configured
        inpainter (OpenCV where the renderer was asked for but cannot re-draw the image)."""
        if self.kind == "synthetic":
            return "synthetic" if self._exact(image_id) else "offline"
        return self.kind

    def _backend(self, kind: str):
        if kind == "synthetic":
            return None
        return self.inpainter if kind == self.kind else self._inpainter(kind)

    def _supports_for(self, kind: str):
        def supports(edit_kind: str, family: str | None) -> bool:
            if kind == "synthetic":
                return edit_kind != "change_attribute" or family in syn.FAMILIES
            return self._backend(kind).supports(edit_kind, family)
        return supports

    @staticmethod
    def _drawable_for(kind: str):
        return (lambda word: word in syn.NOMINAL) if kind == "synthetic" else (lambda word: True)

    def _spec_edit(self, image_id: str):
        img = self.images[image_id]
        spec = json.loads(img["spec"]) if self._exact(image_id) else None

        def edit(graph, e: E.ImageEdit):
            if spec is not None:
                return E.synthetic_edit(graph, spec, e)
            return E.real_edit(graph, e), None
        return edit

    def run(self, positives: list[dict]) -> None:
        by_image: dict[str, list[tuple[dict, Node]]] = defaultdict(list)
        for pos in positives:
            if not pos.get("path") or pos.get("target_object_id") is None:
                continue
            path = json.loads(pos["path"])
            if "category" not in path:
                continue
            by_image[pos["image_id"]].append((pos, Node.from_json(path)))
        if hasattr(self.backend, "prefetch"):
            self.backend.prefetch([q for items in by_image.values() for _, q in items])
        plans: list[tuple[str, E.PlannedEdit]] = []
        for image_id, items in by_image.items():
            kind = self._kind_for(image_id)
            planner = E.Planner(kinds=self.section.edits, levels=self.section.levels,
                                per_image=self.section.per_image, backend=self.backend,
                                supports=self._supports_for(kind), drawable=self._drawable_for(kind), seed=self.ctx.seed,
                                spec_edit=self._spec_edit(image_id))
            planned, refused = planner.plan_image(self.graphs[image_id], items)
            for sid, reason, detail in refused:
                self.refusals[reason] += 1
                self.out.drops.append(Drop(stage="negatives_image", key=sid, reason=reason, detail=detail))
            plans += [(image_id, p) for p in planned if p.negations]
        if hasattr(self.backend, "take_drops"):
            self.out.drops += self.backend.take_drops()
        made: dict[int, Any] = {}
        by_kind: dict[str, list[int]] = defaultdict(list)
        for i, (image_id, _) in enumerate(plans):
            by_kind[self._kind_for(image_id)].append(i)
        for kind, idx in by_kind.items():
            if kind == "synthetic":
                made.update({i: self._render(*plans[i]) for i in idx})
            else:
                made.update(zip(idx, self._model_made(self._backend(kind), kind, [plans[i] for i in idx]),
                                strict=True))
        try:
            for i, (image_id, p) in enumerate(plans):
                result = made[i]
                if isinstance(result, str):
                    self._refuse(p, result, image_id)
                    continue
                self._write(image_id, p, *result)
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
        exact = [(image_id, p) for image_id, p in plans if p.spec is not None]
        if exact:
            for kind in self.section.fidelity_backends:
                if kind != self.kind:
                    self._model_made(self._inpainter(kind), kind, exact, write=False)
        self.out.extra.update({"edits_asked": list(self.section.edits), "levels_asked": list(self.section.levels),
                               "edits": dict(self.counts), "edit_refusals": dict(self.refusals),
                               "edit_images": self.n_images,
                               "fidelity": {k: dict(v) for k, v in self.fidelity.items()}})

    def _refuse(self, p: E.PlannedEdit, reason: str, image_id: str) -> None:
        self.refusals[reason] += len(p.negations)
        for n in p.negations:
            self.out.drops.append(Drop(stage="negatives_image", key=n.positive["sample_id"], reason=reason,
                                       detail=p.edit.describe(self.graphs[image_id])))

    def _original(self, image_id: str) -> PILImage.Image:
        """The original image, decoded once per unit (an image has up to ``per_image`` edits)."""
        if image_id not in self._originals:
            with PILImage.open(io.BytesIO(self.ctx.build.images.read(self.images[image_id]["path"]))) as im:
                self._originals[image_id] = im.convert("RGB")
        return self._originals[image_id]

    def _region(self, image_id: str, object_id: str) -> np.ndarray | None:
        """The object's own pixels (synthetic scenes: its exact mask), else None."""
        img = self.images[image_id]
        if not self._exact(image_id):
            return None
        graph = self.graphs[image_id]
        obj = graph.by_id()[object_id]
        spec = json.loads(img["spec"])
        m = syn._object_mask(obj, spec)
        x1, y1, x2, y2 = syn._int_box(obj.box)
        out = np.zeros((graph.height, graph.width), dtype=bool)
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, graph.width), min(y2, graph.height)
        out[cy1:cy2, cx1:cx2] = m[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
        return out

    def _edit_box(self, image_id: str, p: E.PlannedEdit) -> tuple[float, float, float, float]:
        old = self.graphs[image_id].by_id()[p.edit.object_id].box
        new = p.graph.by_id().get(p.edit.object_id)
        if new is None:
            return tuple(old)
        return (min(old[0], new.box[0]), min(old[1], new.box[1]), max(old[2], new.box[2]), max(old[3], new.box[3]))

    def _render(self, image_id: str, p: E.PlannedEdit):
        img = self.images[image_id]
        truth = self._truth(image_id, p)
        mask = box_mask((img["width"], img["height"]), self._edit_box(image_id, p), self.section.mask_margin)
        return [truth], mask, [None], "synthetic-render", False

    def _model_made(self, inpainter, kind: str, plans, write: bool = True):
        """Pixels from a model backend for every planned edit, batched; on a synthetic source each
        candidate's fidelity against the re-rendered scene is measured."""
        requests, originals = [], []
        for image_id, p in plans:
            graph = self.graphs[image_id]
            prompt, negative = p.edit.prompt(graph)
            original = self._original(image_id)
            originals.append(original)
            requests.append(EditRequest(
                image=original, box=self._edit_box(image_id, p), kind=p.edit.kind, prompt=prompt,
                negative_prompt=negative, word=p.edit.word, family=p.edit.family,
                seed=int(stable_key(self.ctx.seed, image_id, p.edit.key, length=8), 16) % 2**31,
                region=self._region(image_id, p.edit.object_id)))
        if not requests:
            return []
        with device_slot(self.section.device if kind == "diffusers" else "cpu"):
            results = inpainter.edit(requests)
        made: list[Any] = []
        for (image_id, p), original, res in zip(plans, originals, results, strict=True):
            if isinstance(res, str):
                made.append(res)
                continue
            if self.synthetic_source and p.spec is not None:
                truth = self._truth(image_id, p)
                acc = self.fidelity[kind]
                for cand in res.images:
                    f = fidelity(original, cand, truth, res.mask)
                    acc["n"] += 1
                    for k, v in f.items():
                        acc[k] += float(v)
            made.append((res.images, res.mask, list(res.seeds), res.model, True))
        return made if write else []

    def _write(self, image_id: str, p: E.PlannedEdit, candidates, mask, seeds, model: str, by_model: bool) -> None:
        b, img, graph = self.ctx.build, self.images[image_id], self.graphs[image_id]
        prompt, _ = p.edit.prompt(graph)
        _, mask_rel = b.images.put(_mask_png(mask), "png")
        group = stable_key("edit", image_id, p.edit.key, self.ctx.stage_hash)
        taxonomy = self.ctx.section("paths").taxonomy
        box = graph.by_id()[p.edit.object_id].box
        negative_type = E.NEGATIVE_TYPES[p.edit.kind]
        # PNG encoding is the stage's largest CPU cost per candidate (about 30 ms at 640x480): N candidates
        # are encoded on threads (zlib releases the GIL)
        datas = list(self._encoder().map(_png, candidates)) if len(candidates) > 1 else [_png(candidates[0])]
        for c, (data, seed) in enumerate(zip(datas, seeds, strict=True)):
            mid, rel = b.images.put(data, "png")
            if mid == img["image_id"]:  # content-addressed: the same bytes as the original
                self._refuse(p, "edit_invisible", image_id)
                continue
            if mid not in self.written:
                self.written.add(mid)
                self.n_images += 1
                self.rows["images"].append(Image(
                    image_id=mid, source=img["source"], path=rel, width=img["width"], height=img["height"],
                    parent_image_id=image_id, source_ref=img["source_ref"],
                    spec=json.dumps(p.spec, sort_keys=True) if p.spec is not None and not by_model else None,
                    edit=Edit(type=p.edit.kind, object_id=p.edit.object_id, box=box, prompt=prompt, word=p.edit.word,
                              attribute=p.edit.attribute, mask=mask_rel, seed=seed, model=model, group=group,
                              candidate=c)))
                objs, rels, drops = graph_records(mid, p.graph, f"{p.edit.kind}:{image_id}")
                self.rows["objects"] += objs
                self.rows["relations"] += rels
                self.out.drops += drops
            for n in p.negations:
                pos = n.positive
                sample_id = stable_key("inpaint", pos["sample_id"], mid, self.ctx.stage_hash)
                if sample_id in self.samples:  # two edits that drew the same pixels: one negative
                    continue
                self.samples.add(sample_id)
                tasks = tasks_for(n.query, p.graph, polarity="negative", negative_type=negative_type)
                path = {**json.loads(pos["path"]), "edit": p.edit.describe(graph)}
                if by_model:
                    path.update({"review_reason": "model_edit",
                                 "review_detail": f"{model} made the pixels; a filter or a reviewer must pass it"})
                self.rows["expressions"].append(Expression(
                    sample_id=sample_id, image_id=mid,
                    text=pos["text"], template_text=pos["template_text"], template_name=pos["template_name"],
                    polarity="negative", task=tasks.get(taxonomy), tasks=tasks, difficulty=pos["difficulty"],
                    hops=pos["hops"], path=json.dumps(path, sort_keys=True), negative_type=negative_type,
                    negative_level=n.level, negative_source="image", positive_id=pos["sample_id"],
                    needs_review=by_model))
                self.counts[f"{p.edit.kind}/{n.level}"] += 1


STAGE = NegativesImageStage()

__all__ = ["STAGE", "NegativesImageConfig", "NegativesImageStage"]
