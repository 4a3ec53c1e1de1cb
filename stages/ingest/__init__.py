"""ingest: a source's scenes to ``images``, ``objects`` and ``relations`` (and RefCOCO-style human
expressions where the source has them).

The ``[source]`` section picks the source: ``synthetic`` (rendered scenes with exact graphs),
``graphs`` (refforge's scene-graph JSON), ``gqa``, ``coco`` (with optional refs) or ``folder`` (images
only; the proposals stage finds their objects). This stage also makes the build's shards: a unit is
a range of scene indices (:meth:`IngestStage.shard_ranges`); for every source but ``synthetic`` the
indices are positions in the build's append-only listing of the source (:mod:`.listing`), so a source
that grew adds shards instead of shifting them, and an item that disappeared is kept or retracted as
``[build] removed_items`` says.

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

from . import listing as L
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


# What writes the synthetic source's PNG bytes (stages/ingest/synthetic.py ``encode_png``). The bytes are
# the content-addressed image ids, so it enters the hashes of synthetic builds (SyntheticSource.hash_data):
# a build made with another encoder is another build (a resume is refused, --force replaces it), while
# sources whose bytes are stored as read keep their hashes.
PNG_ENCODER = "unfiltered rows, libdeflate 0.9.0 level 1"


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

    def hash_data(self, data: dict[str, Any]) -> dict[str, Any]:
        """The section as hashed: its fields and the PNG encoder (:data:`PNG_ENCODER`; issue 18 changed it)."""
        return {**data, "png_encoder": PNG_ENCODER}


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
    key_inputs = ("start", "stop", "without")  # "without": retracted keys, only where a shard has some
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

    @staticmethod
    def listing_path(root: Path) -> Path:
        return root / "sources" / "listing.json"

    @staticmethod
    def _fingerprint(src: Any) -> list:
        """What identifies the source files' content cheaply: (path, size, mtime) of each."""
        paths = [getattr(src, k, None) for k in ("scene_graphs", "instances", "refs", "path")]
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p is not None and Path(p).is_file()]

    def prepare(self, ctx) -> None:
        """GQA and COCO files are converted, streaming, into the build's own scene-graph JSON Lines (again
        when the source file changed); then every source but ``synthetic`` is listed into the build's
        append-only listing (:mod:`.listing`): new items make new shards, vanished ones are kept or
        retracted (``[build] removed_items``). What changed is kept for the run record
        (``ctx.cached("source_growth")``)."""
        src, b = ctx.section("source"), ctx.build
        if isinstance(src, SyntheticSource):
            return
        if isinstance(src, GqaSource | CocoSource):
            self._convert(ctx, src)
        keys = self._current_keys(ctx, src)
        path = self.listing_path(b.root)
        old = L.load(path)
        if old is None and isinstance(src, FolderSource) and self._folder_listing(b.root).exists():
            # a build from before listings: its first listing is the folder listing it made then
            first = json.loads(self._folder_listing(b.root).read_text())
            old = L.Listing(first, [(r.start, r.stop) for r in scenes.iter_shards(len(first), ctx.shard_size)])
        new, growth = L.update(old, keys, ctx.shard_size, ctx.removed_items)
        # written only when something changed (it grows with the source: no whole-listing comparison)
        if not path.exists() or growth.new_items or new.removed != old.removed:
            L.save(path, new)
        ctx.cached("source_listing", lambda: new)
        ctx.cached("source_growth", lambda: growth)

    def _convert(self, ctx, src: Any) -> None:
        b = ctx.build
        out = self._prepared(b.root, src)
        index = out.with_suffix(".offsets.json")
        ids = out.with_suffix(".ids.json")
        stamp = out.with_suffix(".source.json")
        fingerprint = self._fingerprint(src)
        if index.exists():
            seen = json.loads(stamp.read_text()) if stamp.exists() else None
            if seen is None or seen == fingerprint:  # a build from before stamps: its conversion stands
                if not stamp.exists():
                    atomic_write_bytes(stamp, json.dumps(fingerprint).encode())
                return
        tmp = out.with_name(out.name + ".new")
        if isinstance(src, GqaSource):
            stats = sources.convert_gqa(src.scene_graphs, tmp, image_ext=src.image_ext)
        else:
            stats = sources.convert_coco(src.instances, tmp, refs=src.refs)
        reconverted = index.exists()
        tmp.replace(out)
        # a reconversion (the source file changed) writes drops only for what the earlier one did not skip
        key = stable_key("prepare", ctx.stage_hash, *([json.dumps(fingerprint)] if reconverted else []))
        skipped = [tuple(str(v) for v in k) for k in stats.skipped]
        done_file = out.with_suffix(".skipped.json")
        before = {tuple(x) for x in json.loads(done_file.read_text())} if done_file.exists() else set()
        todo = [k for k in skipped if k[:2] not in {t[:2] for t in before}]
        if todo and not b.reader.has_work("drops", key):
            b.writer("prepare").write("drops", [Drop(stage="ingest", key=k, reason=r, detail=d[0] if d else None)
                                                for k, r, *d in todo], work_key=key, stage="ingest")
        atomic_write_bytes(done_file, json.dumps(skipped).encode())
        atomic_write_bytes(ids, json.dumps(stats.ids).encode())
        atomic_write_bytes(index, json.dumps(stats.offsets).encode())
        atomic_write_bytes(stamp, json.dumps(fingerprint).encode())

    def _current_keys(self, ctx, src: Any) -> list[str]:
        """The source's items now, in its own order, by a key that survives growth: the file (folder), the
        record's image (graphs), the source's image id (GQA, COCO)."""
        if isinstance(src, FolderSource):
            return scenes.list_folder(src.path, src.extensions, src.recursive)
        if isinstance(src, GraphsSource):
            return _record_keys(self._graph_records(ctx, src.path))
        return _unique(self._ids(ctx, src))

    def _graph_records(self, ctx, path: Path) -> list:
        return ctx.cached(str(path), lambda: scenes.read_graph_records(path))

    def _offsets(self, ctx, src: Any) -> list[int]:
        index = self._prepared(ctx.build.root, src).with_suffix(".offsets.json")
        return ctx.cached(str(index), lambda: json.loads(index.read_text()))

    def _ids(self, ctx, src: Any) -> list[str]:
        """Each converted line's image id (read from the lines once for a conversion from before ids)."""
        path = self._prepared(ctx.build.root, src)
        ids = path.with_suffix(".ids.json")

        offsets = self._offsets(ctx, src) if not ids.exists() else None  # (never ctx.cached inside ctx.cached)

        def load() -> list[str]:
            if offsets is None:
                return json.loads(ids.read_text())
            found = [str(r.get("id", f"#{i}")) for i, r in enumerate(sources.read_lines(path, offsets, 0, len(offsets)))]
            atomic_write_bytes(ids, json.dumps(found).encode())
            return found
        return ctx.cached(str(ids), load)

    def _listing(self, ctx) -> L.Listing:
        """The build's listing (made by prepare in this run; read back in a worker process)."""
        return ctx.cached("source_listing", lambda: L.load(self.listing_path(ctx.build.root)))

    def shard_ranges(self, ctx, shard_size: int) -> list[tuple]:
        """The build's units: ranges of scene indices, ``shard_size`` scenes each; for a listed source the
        ranges of its listing, with the retracted keys of a range as a third element where it has any."""
        src = ctx.section("source")
        if isinstance(src, SyntheticSource):
            return [(r.start, r.stop) for r in scenes.iter_shards(src.images, shard_size)]
        listing = self._listing(ctx)
        out: list[tuple] = []
        for i, (start, stop) in enumerate(listing.shards):
            without = listing.without(i)
            out.append((start, stop, without) if without else (start, stop))
        return out

    # -- one unit ----------------------------------------------------------------------------
    def run(self, ctx, section, inputs) -> UnitOutput:
        src = ctx.section("source")
        start, stop = inputs["start"], inputs["stop"]
        if isinstance(src, SyntheticSource):
            out = scenes.ingest_synthetic(range(start, stop), build_seed=ctx.seed, width=src.width,
                                          height=src.height, min_objects=src.min_objects,
                                          max_objects=src.max_objects)
            return self._output(ctx, out)
        # the unit's items: its range of the listing, less the retracted ones, found by key in the source now
        without = set(inputs.get("without") or ())
        keys = [k for k in self._listing(ctx).keys(start, stop) if k not in without]
        if isinstance(src, GraphsSource):
            records = self._graph_records(ctx, src.path)
            where = ctx.cached(f"{src.path}:keys", lambda: {k: i for i, k in enumerate(_record_keys(records))})
            out = scenes.ingest_graphs(records, [where[k] for k in keys if k in where],
                                       images_dir=src.images_dir, relations_from_geometry=src.relations_from_geometry)
        elif isinstance(src, FolderSource):
            out = scenes.ingest_folder(keys, range(len(keys)), root=src.path)
        else:
            path, offsets = self._prepared(ctx.build.root, src), self._offsets(ctx, src)
            ids = self._ids(ctx, src)
            where = ctx.cached(f"{path}:keys", lambda: _first_index(ids))
            records = [sources.read_lines(path, offsets, where[k], where[k] + 1)[0] for k in keys if k in where]
            out = scenes.ingest_graphs(records, range(len(records)), images_dir=src.images_dir, source=src.kind)
        if not isinstance(src, FolderSource):  # (a vanished file is a drop of ingest_folder's own)
            for k in keys:
                if k not in where:  # kept though gone from the source, and the unit ran again (a config change)
                    out.drops.append(Drop(stage="ingest", key=f"{src.kind}:{k}", reason="gone_from_source",
                                          detail="listed by an earlier run; [build] removed_items = 'retract' "
                                                 "leaves it out"))
        return self._output(ctx, out)

    def _output(self, ctx, out: IngestOutput) -> UnitOutput:
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


def _unique(keys: list[str]) -> list[str]:
    """Keys made distinct in order: a second ``k`` is ``k#2`` (a source listing one image twice)."""
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        n = seen.get(k, 0) + 1
        seen[k] = n
        out.append(k if n == 1 else f"{k}#{n}")
    return out


def _record_keys(records: list) -> list[str]:
    """A graphs file's records by their image (a record without one: its position)."""
    return _unique([r["image"] if isinstance(r, dict) and isinstance(r.get("image"), str) and r["image"]
                    else f"#{i}" for i, r in enumerate(records)])


def _first_index(keys: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, k in enumerate(_unique(keys)):
        out.setdefault(k, i)
    return out


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
