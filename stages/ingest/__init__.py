"""ingest: a source's scenes to ``images``, ``objects`` and ``relations`` (and RefCOCO-style human
expressions where the source has them).

The ``[source]`` section picks the source: ``synthetic`` (rendered scenes with exact graphs),
``graphs`` (refforge's scene-graph JSON), ``gqa``, ``coco`` (with optional refs) or ``folder`` (images
only; the proposals stage finds their objects). This stage also makes the build's shards: a unit is
a range of scene indices (:meth:`IngestStage.shard_ranges`).

Modules: :mod:`.scenes` (graph validation and the per-source readers), :mod:`.sources` (streaming
GQA/COCO conversion), :mod:`.synthetic` (the scene generator and renderer).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from refforge._strict import _Strict
from refforge.pipeline.stage import Stage, UnitOutput
from refforge.schemas import Drop, Expression
from refforge.stages.paths import PathsConfig
from refforge.stages.paths.search import TargetSelection, drop_category, referring_paths
from refforge.stages.scene.keys import stable_key
from refforge.storage.atomic import atomic_write_bytes

from . import scenes, sources
from .scenes import IngestOutput

# -- the [source] section ---------------------------------------------------------------------------

#: bounds of the synthetic source: a scene is rendered in memory (8192 x 8192 takes about 1.6 GB and
#: 9 s); the layout places up to about 64 objects, and reliably 48 (more as a minimum would leave
#: scenes that cannot be placed)
MAX_SYNTHETIC_IMAGES = 10_000_000
MAX_SYNTHETIC_SIDE = 8192
MAX_MIN_OBJECTS = 48
MAX_OBJECTS = 64
#: a file extension: a dot and 1-16 letters, digits, "_", "+" or "-"
_EXTENSION = re.compile(r"^\.[a-z0-9][a-z0-9_+-]{0,15}$")


class SyntheticSource(_Strict):
    """Rendered scenes with exact scene graphs, deterministic by seed (offline)."""

    kind: Literal["synthetic"] = "synthetic"
    images: int = Field(default=240, ge=1, le=MAX_SYNTHETIC_IMAGES)
    width: int = Field(default=512, ge=64, le=MAX_SYNTHETIC_SIDE)
    height: int = Field(default=384, ge=64, le=MAX_SYNTHETIC_SIDE)
    min_objects: int = Field(default=3, ge=1, le=MAX_MIN_OBJECTS)
    max_objects: int = Field(default=12, ge=1, le=MAX_OBJECTS)

    @model_validator(mode="after")
    def _range(self):
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        return self


class GraphsSource(_Strict):
    """refforge's own scene-graph format: a JSON list (or JSON Lines) of
    ``{"image": path, "objects": [{"id", "name", "attributes", "box"}], "relations": [{"subject",
    "predicate", "object"}]}`` with image paths relative to ``images_dir``."""

    kind: Literal["graphs"] = "graphs"
    path: Path
    images_dir: Path
    relations_from_geometry: bool = False


class GqaSource(_Strict):
    """GQA scene graphs (``train_sceneGraphs.json`` / ``val_sceneGraphs.json``) plus the image folder."""

    kind: Literal["gqa"] = "gqa"
    scene_graphs: Path
    images_dir: Path
    image_ext: str = Field(default=".jpg", pattern=r"^\.[A-Za-z0-9][A-Za-z0-9_+-]{0,15}$")


class CocoSource(_Strict):
    """COCO instances (relations from geometry), optionally with RefCOCO/RefCOCO+/RefCOCOg refs."""

    kind: Literal["coco"] = "coco"
    instances: Path
    images_dir: Path
    refs: Path | None = None


class FolderSource(_Strict):
    """A folder of images, searched recursively; no objects (the proposals stage finds them)."""

    kind: Literal["folder"] = "folder"
    path: Path
    extensions: list[str] = Field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp"])
    recursive: bool = True

    @model_validator(mode="after")
    def _exts(self):
        self.extensions = sorted({e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions})
        if not self.extensions:
            raise ValueError("extensions must name at least one file extension")
        bad = [e for e in self.extensions if not _EXTENSION.match(e)]
        if bad:
            raise ValueError(f"extensions must be file extensions like '.jpg' (a dot and up to 16 letters or "
                             f"digits), not {', '.join(repr(e) for e in bad[:5])}")
        if len(self.extensions) > 64:
            raise ValueError("extensions: at most 64")
        return self


Source = Annotated[SyntheticSource | GraphsSource | GqaSource | CocoSource | FolderSource,
                   Field(discriminator="kind")]
SOURCE_KINDS = {"synthetic": SyntheticSource, "graphs": GraphsSource, "gqa": GqaSource, "coco": CocoSource,
                "folder": FolderSource}


# -- the stage --------------------------------------------------------------------------------------


class IngestStage(Stage):
    name = "ingest"
    version = 2
    config = None  # its section is [source]
    uses: ClassVar[dict[str, Any]] = {"source": Source, "paths": PathsConfig}
    reads = ()
    writes = ("images", "objects", "relations", "expressions")
    key_inputs = ("start", "stop")
    joins = "graph"
    core = True
    default = True

    def preflight(self, cfg: Any) -> list[str]:
        """The source's files and folders exist (checked before the build writes anything)."""
        src = cfg.source
        wanted: list[tuple[str, Path | None, str]] = []
        if isinstance(src, GraphsSource):
            wanted = [("path", src.path, "file"), ("images_dir", src.images_dir, "folder")]
        elif isinstance(src, GqaSource):
            wanted = [("scene_graphs", src.scene_graphs, "file"), ("images_dir", src.images_dir, "folder")]
        elif isinstance(src, CocoSource):
            wanted = [("instances", src.instances, "file"), ("images_dir", src.images_dir, "folder"),
                      ("refs", src.refs, "file")]
        elif isinstance(src, FolderSource):
            wanted = [("path", src.path, "folder")]
        out = []
        for key, path, kind in wanted:
            if path is None:
                continue
            ok = path.is_file() if kind == "file" else path.is_dir()
            if not ok:
                what = "does not exist" if not path.exists() else f"is not a {kind}"
                out.append(f"source.{key}: {path} {what}")
        return out

    # -- the shards --------------------------------------------------------------------------
    @staticmethod
    def _prepared(root: Path, src: Any) -> Path:
        return root / "sources" / f"{src.kind}.jsonl"

    @staticmethod
    def _folder_listing(root: Path) -> Path:
        return root / "sources" / "folder.json"

    def prepare(self, ctx) -> None:
        """GQA and COCO files are converted once, streaming, into the build's own scene-graph JSON
        Lines; a folder is listed once into ``sources/folder.json`` (a resumed build sees the same
        images, in the same shards, even when files were added to the folder since)."""
        src, b = ctx.section("source"), ctx.build
        if isinstance(src, FolderSource):
            listing = self._folder_listing(b.root)
            if not listing.exists():
                files = scenes.list_folder(src.path, src.extensions, src.recursive)
                listing.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(listing, json.dumps(files).encode())
            return
        if not isinstance(src, GqaSource | CocoSource):
            return
        out = self._prepared(b.root, src)
        index = out.with_suffix(".offsets.json")
        if index.exists():
            return
        if isinstance(src, GqaSource):
            stats = sources.convert_gqa(src.scene_graphs, out, image_ext=src.image_ext)
        else:
            stats = sources.convert_coco(src.instances, out, refs=src.refs)
        key = stable_key("prepare", ctx.stage_hash)
        if stats.skipped and not b.reader.has_work("drops", key):
            b.writer("prepare").write("drops", [Drop(stage="ingest", key=str(k), reason=str(r),
                                                     detail=str(d[0]) if d else None)
                                                for k, r, *d in stats.skipped], work_key=key, stage="ingest")
        atomic_write_bytes(index, json.dumps(stats.offsets).encode())

    def _graph_records(self, ctx, path: Path) -> list:
        return ctx.cached(str(path), lambda: scenes.read_graph_records(path))

    def _offsets(self, ctx, src: Any) -> list[int]:
        index = self._prepared(ctx.build.root, src).with_suffix(".offsets.json")
        return ctx.cached(str(index), lambda: json.loads(index.read_text()))

    def _folder_files(self, ctx) -> list[str]:
        listing = self._folder_listing(ctx.build.root)
        return ctx.cached(str(listing), lambda: json.loads(listing.read_text()))

    def shard_ranges(self, ctx, shard_size: int) -> list[tuple[int, int]]:
        """The build's units: ranges of scene indices, ``shard_size`` scenes each."""
        src = ctx.section("source")
        if isinstance(src, SyntheticSource):
            n = src.images
        elif isinstance(src, GraphsSource):
            n = len(self._graph_records(ctx, src.path))
        elif isinstance(src, FolderSource):
            n = len(self._folder_files(ctx))
        else:
            n = len(self._offsets(ctx, src))
        return [(r.start, r.stop) for r in scenes.iter_shards(n, shard_size)]

    # -- one unit ----------------------------------------------------------------------------
    def run(self, ctx, section, inputs) -> UnitOutput:
        src = ctx.section("source")
        start, stop = inputs["start"], inputs["stop"]
        if isinstance(src, SyntheticSource):
            out = scenes.ingest_synthetic(range(start, stop), build_seed=ctx.seed, width=src.width,
                                          height=src.height, min_objects=src.min_objects,
                                          max_objects=src.max_objects)
        elif isinstance(src, GraphsSource):
            out = scenes.ingest_graphs(self._graph_records(ctx, src.path), range(start, stop),
                                       images_dir=src.images_dir, relations_from_geometry=src.relations_from_geometry)
        elif isinstance(src, FolderSource):
            out = scenes.ingest_folder(self._folder_files(ctx), range(start, stop), root=src.path)
        else:
            records = sources.read_lines(self._prepared(ctx.build.root, src), self._offsets(ctx, src), start, stop)
            out = scenes.ingest_graphs(records, range(len(records)), images_dir=src.images_dir, source=src.kind)
        tables: dict[str, list] = {}
        if out.refs:
            tables["expressions"] = ref_expressions(ctx.section("paths"), out)
        images = []
        for img in out.images:  # one per image_id: identical bytes were merged (IngestOutput.add)
            ctx.build.images.put(img.data, img.ext)
            images.append(img.record)
        return UnitOutput({"images": images, "objects": out.objects, "relations": out.relations, **tables},
                          out.drops, out.scenes_in)

    def model_ids(self, ctx, section) -> dict[str, str]:
        return {"ingest": ctx.section("source").kind}


def _excluded_reason(why: str) -> str:
    """The drop reason of a ref whose target the ``[paths]`` target filter excludes, by the filter's
    message (which may carry values): ``ref_target_stuff_category``, ``ref_target_too_small`` ..."""
    slug = drop_category(why)
    return f"ref_target_{slug}" if slug != why else "ref_target_excluded"


def ref_expressions(p: PathsConfig, out: IngestOutput) -> list[Expression]:
    """RefCOCO-style human expressions as positive samples; the level is the target's minimal
    constraint count in the scene graph, searched with the ``[paths]`` bounds and target filter (area,
    stuff block-list, ``drop_border_cut``). A ref is dropped with its cause: its target excluded by
    the filter (``ref_target_too_small``, ``ref_target_cut_by_border``, ...), no unique path within the
    bounds (``ref_target_no_unique_path``) or no text (``ref_empty_text``); the detail holds the
    filter's message, the ref id, the object id and name, and the sentence."""
    selection = TargetSelection(min_area_frac=p.min_area_frac, max_area_frac=p.max_area_frac,
                                blocklist=tuple(p.blocklist), drop_border_cut=p.drop_border_cut)
    results: dict[str, tuple[dict[str, int], dict[str, str]]] = {}
    boxes = {(o.image_id, o.object_id): o.box for o in out.objects}
    names = {(o.image_id, o.object_id): o.name for o in out.objects}
    rows = []
    seen: set[str] = set()
    for ref in out.refs:
        image_id, target = ref["image_id"], ref["object_id"]
        if image_id not in results:
            res = referring_paths(out.graphs[image_id], max_hops=p.max_hops, max_constraints=p.max_constraints,
                                  max_per_target=1, positions=p.positions, selection=selection)
            g = out.graphs[image_id]
            results[image_id] = (res.levels, {o.id: why for o in g.objects
                                              if (why := selection.reason(o, g.width, g.height)) is not None})
        levels, excluded = results[image_id]
        level = levels.get(target)
        if level is None or not ref["text"].strip():
            what = f"ref {ref['ref_id']}, object {target} ({names.get((image_id, target))}): {ref['text']!r}"
            if not ref["text"].strip():
                reason, detail = "ref_empty_text", what
            elif target in excluded:
                reason, detail = _excluded_reason(excluded[target]), f"{excluded[target]}; {what}"
            else:
                reason = "ref_target_no_unique_path"
                detail = (f"no unique path within max_hops = {p.max_hops}, max_constraints = {p.max_constraints}"
                          f"{'' if p.positions else ', positions = false'}; {what}")
            out.drops.append(Drop(stage="ingest", key=f"{image_id}/ref/{ref['ref_id']}", reason=reason,
                                  detail=detail))
            continue
        sample_id = stable_key("ref", image_id, target, ref["ref_id"], ref["text"])
        if sample_id in seen:  # the same sentence twice in one ref: one sample
            out.drops.append(Drop(stage="ingest", key=f"{image_id}/ref/{ref['ref_id']}", reason="ref_duplicate_sentence",
                                  detail=f"ref {ref['ref_id']}, object {target}: {ref['text']!r}"))
            continue
        seen.add(sample_id)
        rows.append(Expression(
            sample_id=sample_id, image_id=image_id,
            text=ref["text"], polarity="positive", target_object_id=target, gt_box=boxes[(image_id, target)],
            task="refcoco", tasks={"source": "refcoco", "split": str(ref["split"])}, difficulty=level))
    return rows


STAGE = IngestStage()

__all__ = ["SOURCE_KINDS", "STAGE", "CocoSource", "FolderSource", "GqaSource", "GraphsSource", "IngestStage",
           "Source", "SyntheticSource", "ref_expressions"]
