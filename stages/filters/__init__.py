"""filters: scored, thresholded measurements of the negatives; one ``scores`` row per (subject, filter).

Nothing is deleted: every measurement is a row (``value``, ``threshold``, ``passed``, ``detail``) and
exports choose by the ``passed`` flags (flows/export.py: a sample is left out when a score of the
sample or of its image failed; of an edit's N candidates only the one a best-of-N filter chose is
exported, or the first when no best-of-N filter ran; a ``clip_margin`` pass clears a model edit's
``needs_review``). Subjects: image filters score the derived image (``subject_id`` = image_id), the
CLIP margin scores the sample (``subject_id`` = sample_id).

Filters (``run``), on the inpainting edits of negatives_image (flips are not filtered):

* ``clip_margin`` (open_clip, any model): image negatives: cos(positive text, original) - cos(positive
  text, edited) must reach ``clip_margin`` (the expression must fit the edit less than the original,
  FineCops-Ref's CLIP step); with ``text_negatives`` also text negatives: cos(positive, image) -
  cos(negative, image) must reach ``clip_text_margin`` (a text negative CLIP prefers to its positive
  is suspicious).
* ``dire`` (diffusers): DDIM inversion and reconstruction; the score is a DIRE classifier's
  probability when ``dire_classifier`` is given, else the normalised reconstruction error; passes at
  or below ``dire_threshold`` (0.2, as FineCops-Ref).
* ``dinov2`` (transformers Dinov2Model): cosine similarity of each candidate of an edit to the
  original; the most similar candidate of each edit passes (best of N), provided it reaches
  ``dinov2_min_similarity``.
* offline stand-ins (numpy; they measure what they are named for, not what the models do):
  ``outside_change`` (mean change outside the mask: passes at or below ``outside_change_max``),
  ``masked_change`` (mean change inside the mask: an edit that changed nothing fails below
  ``masked_change_min``), ``seam`` (gradient energy on the mask's border relative to the original's:
  passes at or below ``seam_max``).

Models load once per worker process (:meth:`StageContext.cached`), run batched, and hold the device
slot (:func:`refforge.pipeline.devices.device_slot`) while they run.
"""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from typing import Any, Literal

import numpy as np
from PIL import Image as PILImage
from pydantic import Field, model_validator

from refforge._strict import _Strict
from refforge.pipeline.devices import device_slot
from refforge.pipeline.inputs import graph_keys
from refforge.pipeline.stage import Stage, UnitOutput
from refforge.schemas import Drop, Score

from . import scorers as S

FILTERS: tuple[str, ...] = ("clip_margin", "dire", "dinov2", "outside_change", "masked_change", "seam")
MODEL_FILTERS: frozenset[str] = frozenset({"clip_margin", "dire", "dinov2"})
VERIFYING_FILTERS: frozenset[str] = frozenset({"clip_margin"})
"""Filters whose pass says the expression no longer fits the edited image (they clear needs_review)."""
BEST_OF_N_FILTERS: frozenset[str] = frozenset({"dinov2"})
EDIT_TYPES: frozenset[str] = frozenset({"remove", "replace_category", "change_attribute"})


class FiltersConfig(_Strict):
    run: list[Literal["clip_margin", "dire", "dinov2", "outside_change", "masked_change", "seam"]] = Field(
        default_factory=lambda: ["outside_change", "masked_change", "seam"])
    text_negatives: bool = Field(default=False, description="clip_margin: also score text negatives")
    clip_model: str | None = Field(default=None, description="an open_clip model name or hf-hub:/local id")
    clip_pretrained: str | None = Field(default=None, description="its checkpoint (a file path or a tag)")
    clip_margin: float = Field(default=0.0, description="image negatives: required drop of the text's similarity")
    clip_text_margin: float = Field(default=0.0, description="text negatives: required lead of the positive")
    dire_model: str | None = Field(default=None, description="a diffusers folder (pixel UNet, or latent SD)")
    dire_classifier: str | None = Field(default=None, description="a DIRE classifier checkpoint (ResNet-50)")
    dire_steps: int = Field(default=20, ge=1, le=1000)
    dire_size: int = Field(default=256, ge=32, le=2048)
    dire_threshold: float = Field(default=0.2, ge=0)
    dinov2_model: str | None = Field(default=None, description="a Dinov2Model (local path or hub id)")
    dinov2_min_similarity: float = Field(default=0.0, ge=-1, le=1)
    outside_change_max: float = Field(default=0.002, ge=0, le=1)
    masked_change_min: float = Field(default=0.01, ge=0, le=1)
    seam_max: float = Field(default=3.0, ge=0)
    device: str = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    batch_size: int = Field(default=16, ge=1, le=1024)

    @model_validator(mode="after")
    def _models(self):
        need = {"clip_margin": "clip_model", "dire": "dire_model", "dinov2": "dinov2_model"}
        for f, field in need.items():
            if f in self.run and not getattr(self, field):
                raise ValueError(f"filters.run has {f!r}, which needs filters.{field} (a local path or a hub id)")
        if len(set(self.run)) != len(self.run):
            raise ValueError(f"filters.run names a filter twice: {self.run}")
        return self


def _image(data: bytes, mode: str = "RGB") -> PILImage.Image:
    with PILImage.open(io.BytesIO(data)) as im:
        return im.convert(mode)


class FiltersStage(Stage):
    name = "filters"
    version = 1
    config = FiltersConfig
    requires = ("negatives_image",)
    reads = ("images", "expressions")
    writes = ("scores",)
    key_inputs = ("ingest", "paths", "refine", "negatives_image")

    def needed_packages(self, section: FiltersConfig) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if "clip_margin" in section.run:
            out += [("torch", "models"), ("open_clip", "models")]
        if "dire" in section.run:
            out += [("torch", "models"), ("diffusers", "models")]
        if "dinov2" in section.run:
            out += [("torch", "models"), ("transformers", "models")]
        return list(dict.fromkeys(out))

    def model_ids(self, ctx, section: FiltersConfig) -> dict[str, str]:
        ids = {"clip_margin": f"{section.clip_model}:{section.clip_pretrained or ''}",
               "dire": f"{section.dire_model}" + (f"+{section.dire_classifier}" if section.dire_classifier else ""),
               "dinov2": f"{section.dinov2_model}"}
        return {f"filters.{f}": ids.get(f, "offline") for f in section.run}

    # -- models, once per process ---------------------------------------------------------------
    def _scorer(self, ctx, section: FiltersConfig, name: str):
        opts: dict[str, Any] = {"device": section.device, "dtype": section.dtype, "batch_size": section.batch_size}
        if name == "clip":
            opts.update(model=section.clip_model, pretrained=section.clip_pretrained)
        elif name == "dinov2":
            opts.update(model=section.dinov2_model)
        else:
            opts.update(model=section.dire_model, steps=section.dire_steps, size=section.dire_size,
                        classifier=section.dire_classifier)
        return ctx.cached(f"scorer:{name}:{json.dumps(opts, sort_keys=True)}", lambda: S.make_scorer(name, **opts))

    # -- one unit ---------------------------------------------------------------------------------
    def run(self, ctx, section: FiltersConfig, inputs) -> UnitOutput:
        b = ctx.build
        out = UnitOutput()
        derived = [r for r in b.reader.read("images", [inputs["negatives_image"]]).to_pylist()
                   if r.get("edit") and r["edit"].get("type") in EDIT_TYPES]
        originals = {r["image_id"]: r for r in b.reader.read("images", graph_keys(inputs)).to_pylist()}
        samples = [s for s in b.reader.read("expressions", [inputs["negatives_image"]]).to_pylist()
                   if s["image_id"] in {d["image_id"] for d in derived}]
        texts: list[dict] = []
        pos_text: dict[str, str] = {}
        if section.text_negatives and "clip_margin" in section.run:
            texts = b.reader.read("expressions", [inputs["refine"]]).to_pylist()
            pos_text = {p["sample_id"]: p["text"] for p in b.reader.read(
                "expressions", [inputs["paths"], *inputs.get("described", ())]).to_pylist()}
        out.items_in = len(derived) + len(texts)
        scores: list[Score] = []
        counts: Counter = Counter()
        cache: dict[str, PILImage.Image] = {}

        def load(path: str, mode: str = "RGB") -> PILImage.Image:
            if path not in cache:
                cache[path] = _image(b.images.read(path), mode)
            return cache[path]

        usable = []
        for d in derived:
            parent = originals.get(d["parent_image_id"])
            if parent is None or not d["edit"].get("mask"):
                out.drops.append(Drop(stage="filters", key=d["image_id"], reason="no_original_or_mask",
                                      detail=f"parent {d['parent_image_id']}"))
                continue
            usable.append((d, parent))

        def add(subject: str, name: str, value: float, threshold: float | None, passed: bool, **detail: Any):
            scores.append(Score(subject_id=subject, filter=name, value=float(value), passed=bool(passed),
                                threshold=threshold, detail=json.dumps(detail, sort_keys=True) if detail else None))
            counts[f"{name}/{'passed' if passed else 'failed'}"] += 1

        # offline stand-ins: one image at a time (numpy)
        offline = [f for f in section.run if f not in MODEL_FILTERS]
        for d, parent in usable if offline else ():
            orig, edited = load(parent["path"]), load(d["path"])
            mask = np.asarray(load(d["edit"]["mask"], "L")) > 127
            if "outside_change" in offline:
                v = S.outside_change(orig, edited, mask)
                add(d["image_id"], "outside_change", v, section.outside_change_max, v <= section.outside_change_max)
            if "masked_change" in offline:
                v = S.masked_change(orig, edited, mask)
                add(d["image_id"], "masked_change", v, section.masked_change_min, v >= section.masked_change_min)
            if "seam" in offline:
                v = S.seam_score(orig, edited, mask)
                add(d["image_id"], "seam", v, section.seam_max, v <= section.seam_max)

        with device_slot(section.device):
            if "dire" in section.run and usable:
                dire = self._scorer(ctx, section, "dire")
                values, _maps = dire.score([load(d["path"]) for d, _ in usable])
                # the threshold means a probability with a DIRE classifier, a mean error without one
                measure = "classifier_probability" if dire.classifier is not None else "reconstruction_error"
                for (d, _), v in zip(usable, values, strict=True):
                    add(d["image_id"], "dire", v, section.dire_threshold, v <= section.dire_threshold, score=measure)
            if "dinov2" in section.run and usable:
                self._dinov2(ctx, section, usable, load, add)
            if "clip_margin" in section.run:
                self._clip(ctx, section, usable, samples, texts, pos_text, originals, load, add, out)
        out.tables["scores"] = scores
        out.extra = {"scores": dict(counts)}
        return out

    def _dinov2(self, ctx, section, usable, load, add) -> None:
        scorer = self._scorer(ctx, section, "dinov2")
        groups: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
        for d, parent in usable:
            groups[d["edit"].get("group") or d["image_id"]].append((d, parent))
        parents = {p["image_id"]: p for _, p in usable}  # each original once
        cand_emb = scorer.embeddings([load(d["path"]) for d, _ in usable])
        par_emb = dict(zip(parents, scorer.embeddings([load(p["path"]) for p in parents.values()]), strict=True))
        row = {d["image_id"]: i for i, (d, _) in enumerate(usable)}
        for group, members in groups.items():
            members.sort(key=lambda m: (m[0]["edit"].get("candidate") or 0, m[0]["image_id"]))
            sims, best = S.best_of_n(par_emb[members[0][1]["image_id"]],
                                   np.stack([cand_emb[row[d["image_id"]]] for d, _ in members]))
            for i, ((d, _), sim) in enumerate(zip(members, sims, strict=True)):
                chosen = i == best and sim >= section.dinov2_min_similarity
                add(d["image_id"], "dinov2", sim, section.dinov2_min_similarity, chosen, group=group,
                    candidates=len(members), best=i == best)

    def _clip(self, ctx, section, usable, samples, texts, pos_text, originals, load, add, out: UnitOutput
              ) -> None:
        scorer = self._scorer(ctx, section, "clip")
        by_image = {d["image_id"]: (d, p) for d, p in usable}
        items = [(s, *by_image[s["image_id"]]) for s in samples if s["image_id"] in by_image]
        if items:
            margins = S.clip_margin_image(scorer, [load(p["path"]) for _, _, p in items],
                                        [load(d["path"]) for _, d, _ in items], [s["text"] for s, _, _ in items])
            for (s, d, _), v in zip(items, margins, strict=True):
                add(s["sample_id"], "clip_margin", v, section.clip_margin, v >= section.clip_margin,
                    image_id=d["image_id"], kind="image")
        if texts:
            ok = [t for t in texts if t["positive_id"] in pos_text and t["image_id"] in originals]
            kept = {t["sample_id"] for t in ok}
            for t in texts:
                if t["sample_id"] not in kept:
                    out.drops.append(Drop(stage="filters", key=t["sample_id"], reason="no_positive_or_image"))
            if ok:
                margins = S.clip_margin_text(scorer, [load(originals[t["image_id"]]["path"]) for t in ok],
                                           [pos_text[t["positive_id"]] for t in ok], [t["text"] for t in ok])
                for t, v in zip(ok, margins, strict=True):
                    add(t["sample_id"], "clip_margin", v, section.clip_text_margin, v >= section.clip_text_margin,
                        kind="text")

    def summary(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        counts: Counter = Counter()
        for e in extras:
            counts.update(e.get("scores", {}))
        out: dict[str, dict[str, int]] = {}
        for k, v in sorted(counts.items()):
            name, verdict = k.rsplit("/", 1)
            out.setdefault(name, {"passed": 0, "failed": 0})[verdict] += v
        # a filter that failed everything it measured leaves exports without those negatives: say so
        warnings = [f"filters: {name} failed all {c['failed']} it scored (exports leave them out; check its "
                    f"threshold and model)" for name, c in out.items() if c["failed"] and not c["passed"]]
        return {"scores": out, **({"warnings": warnings} if warnings else {})}


STAGE = FiltersStage()




# ---------------------------------------------------------------------------------------------------
# What an export keeps (flows/export.py): pure over rows, no models
# ---------------------------------------------------------------------------------------------------

def edit_groups(edits: dict[str, dict[str, Any]], best_scored: set[str]) -> tuple[dict[str, int], set[str]]:
    """Per edit (its ``group``, shared by its N candidates): the lowest ``candidate`` number, and the groups
    of which a best-of-N filter scored a candidate image (``best_scored``: image ids)."""
    first: dict[str, int] = {}
    groups_scored: set[str] = set()
    for image_id, e in edits.items():
        g = e.get("group")
        if g is None:
            continue
        first[g] = min(first.get(g, 1 << 30), e.get("candidate") or 0)
        if image_id in best_scored:
            groups_scored.add(g)
    return first, groups_scored


def gate(samples: list[dict[str, Any]], scores: list[dict[str, Any]], edits: dict[str, dict[str, Any]]
         ) -> tuple[list[dict[str, Any]], Counter]:
    """The samples an export keeps by the filters' verdicts, and why the others were left out.

    ``edits``: image_id -> its ``edit`` (derived images). A sample is left out when a score of the
    sample or of its image failed; of an edit's candidates only the one a best-of-N filter chose is
    kept, or the first (lowest ``candidate``) when no best-of-N filter scored the edit. A kept model
    edit (its path's ``review_reason`` is ``model_edit``) with a passing verifying filter
    (:data:`VERIFYING_FILTERS`) is no longer ``needs_review``. Samples are returned as new dicts."""
    failed: dict[str, set[str]] = defaultdict(set)
    verified: set[str] = set()
    best_scored: set[str] = set()
    for s in scores:
        if not s["passed"]:
            failed[s["subject_id"]].add(s["filter"])
        elif s["filter"] in VERIFYING_FILTERS:
            verified.add(s["subject_id"])
        if s["filter"] in BEST_OF_N_FILTERS:
            best_scored.add(s["subject_id"])
    first, groups_scored = edit_groups(edits, best_scored)
    kept: list[dict[str, Any]] = []
    dropped: Counter = Counter()
    for s in samples:
        bad = sorted(failed.get(s["sample_id"], set()) | failed.get(s["image_id"], set()))
        if bad:
            dropped[f"failed filter {bad[0]}"] += 1
            continue
        e = edits.get(s["image_id"])
        g = e.get("group") if e else None
        if g is not None and g not in groups_scored and (e.get("candidate") or 0) != first[g]:
            dropped["another candidate of its edit (no best-of-N filter ran)"] += 1
            continue
        s = dict(s)
        if s.get("needs_review") and s["sample_id"] in verified and _review_reason(s) == "model_edit":
            s["needs_review"] = False
        kept.append(s)
    return kept, dropped


def _review_reason(sample: dict[str, Any]) -> str | None:
    try:
        return json.loads(sample.get("path") or "{}").get("review_reason")
    except ValueError:
        return None
__all__ = ["BEST_OF_N_FILTERS", "FILTERS", "STAGE", "VERIFYING_FILTERS", "FiltersConfig", "FiltersStage", "edit_groups", "gate"]
