"""What one unit of work of each stage reads and writes: the I/O around the pure stage functions.

Each ``*_unit(build, config, inputs)`` reads its inputs from the build's tables by work key, calls
the stage logic in :mod:`refforge.stages` and returns a :class:`UnitOutput` (rows per table, drops,
counts); :func:`refforge.flows.build._commit` validates and writes them.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa

from refforge.config import CocoSource, Config, FolderSource, GqaSource, GraphsSource, SyntheticSource
from refforge.gcpause import gc_paused
from refforge.schemas import CotTrace, Drop, Edit, Expression, Image, Object, Record, Relation, Score
from refforge.stages import ingest as ingest_stage
from refforge.stages.graph import SceneGraph
from refforge.stages.keys import stable_key
from refforge.stages.query import Node
from refforge.stages.records import graphs_from_tables
from refforge.storage import BuildDir
from refforge.storage.atomic import atomic_write_bytes

# -- model clients -------------------------------------------------------------------------------

_CLIENTS: dict[tuple[str, str], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def endpoint_client(ep: Any, cache_path: Path):
    """An LLMClient for a :class:`refforge.config.ModelEndpoint`, with a persistent response cache
    at ``cache_path`` (the build's, or ``refforge eval``'s own)."""
    from refforge.llm import LLMClient, ResponseCache

    return LLMClient(
        ep.base_url, ep.model, api_key_env=ep.api_key_env, concurrency=ep.concurrency,
        timeout_s=ep.timeout_s, max_retries=ep.max_retries, image_longest_side=ep.image_longest_side,
        structured_output=ep.structured_output, price_per_1k_input=ep.price_per_1k_input,
        price_per_1k_output=ep.price_per_1k_output, cache=ResponseCache(cache_path))


def model_client(b: BuildDir, cfg: Config, which: str):
    """One LLMClient per build, endpoint kind and process, with the build's persistent response cache
    (``<build>/cache/llm.sqlite``), so a re-run or a resumed build sends no request twice."""
    ep = getattr(cfg, which)
    key = (str(b.root.resolve()), which)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            (b.root / "cache").mkdir(exist_ok=True)
            _CLIENTS[key] = endpoint_client(ep, b.root / "cache" / "llm.sqlite")
        return _CLIENTS[key]


def client_usage(root: Path) -> dict[str, Any]:
    """Usage of this process's clients of a build so far (endpoint -> stage -> counters)."""
    root_key = str(Path(root).resolve())
    with _CLIENTS_LOCK:
        clients = [(w, c) for (r, w), c in _CLIENTS.items() if r == root_key]
    return {which: c.usage() for which, c in clients}


def usage_delta(after: Any, before: Any) -> Any:
    """``after - before`` of nested usage counters (numbers subtract, dicts recurse, the rest is kept)."""
    if isinstance(after, dict):
        b = before if isinstance(before, dict) else {}
        out = {k: usage_delta(v, b.get(k)) for k, v in after.items()}
        return {k: v for k, v in out.items() if v not in (0, 0.0, {}, None)}
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        return after - (before if isinstance(before, (int, float)) else 0)
    return after


def usage_sum(a: Any, b: Any) -> Any:
    """``a + b`` of nested usage counters (the inverse of :func:`usage_delta`)."""
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = a or {}, b or {}
        return {k: usage_sum(a.get(k), b.get(k)) for k in {**a, **b}}
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return round(a + b, 6) if isinstance(a, float) or isinstance(b, float) else a + b
    return b


def close_clients(root: Path) -> dict[str, Any]:
    """Close this build's clients; returns their usage per endpoint and stage for the run file."""
    usage = {}
    root_key = str(Path(root).resolve())
    with _CLIENTS_LOCK:
        for (r, which) in [k for k in _CLIENTS if k[0] == root_key]:
            client = _CLIENTS.pop((r, which))
            usage[which] = client.usage()
            client.close()
    return usage


@dataclass
class UnitOutput:
    tables: dict[str, list[Record]] = field(default_factory=dict)
    drops: list[Drop] = field(default_factory=list)
    items_in: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# -- sources ------------------------------------------------------------------------------------

def _prepared(b: BuildDir, cfg: Config) -> Path:
    return b.root / "sources" / f"{cfg.source.kind}.jsonl"


def _folder_listing(b: BuildDir) -> Path:
    return b.root / "sources" / "folder.json"


def prepare_source(b: BuildDir, cfg: Config) -> None:
    """GQA and COCO files are converted once, streaming, into the build's own scene-graph JSON Lines;
    a folder is listed once into ``sources/folder.json`` (a resumed build sees the same images, in
    the same shards, even when files were added to the folder since)."""
    src = cfg.source
    if isinstance(src, FolderSource):
        listing = _folder_listing(b)
        if not listing.exists():
            files = ingest_stage.list_folder(src.path, src.extensions, src.recursive)
            listing.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(listing, json.dumps(files).encode())
        return
    if not isinstance(src, GqaSource | CocoSource):
        return
    out = _prepared(b, cfg)
    index = out.with_suffix(".offsets.json")
    if index.exists():
        return
    from refforge.stages import sources

    if isinstance(src, GqaSource):
        stats = sources.convert_gqa(src.scene_graphs, out, image_ext=src.image_ext)
    else:
        stats = sources.convert_coco(src.instances, out, refs=src.refs)
    key = stable_key("prepare", cfg.stage_hash("ingest"))
    if stats.skipped and not b.reader.has_work("drops", key):
        b.writer("prepare").write("drops", [Drop(stage="ingest", key=str(k), reason=str(r))
                                            for k, r in stats.skipped], work_key=key, stage="ingest")
    atomic_write_bytes(index, json.dumps(stats.offsets).encode())


_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()


def _cached(key: str, load: Callable[[], Any]) -> Any:
    """Per-process cache of source files, loaded once even when shard tasks ask at the same time."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load()
        return _CACHE[key]


def _graph_records(path: Path) -> list:
    return _cached(str(path), lambda: ingest_stage.read_graph_records(path))


def _offsets(b: BuildDir, cfg: Config) -> list[int]:
    index = _prepared(b, cfg).with_suffix(".offsets.json")
    return _cached(str(index), lambda: json.loads(index.read_text()))


def _folder_files(b: BuildDir, cfg: Config) -> list[str]:
    listing = _folder_listing(b)
    return _cached(str(listing), lambda: json.loads(listing.read_text()))


def shard_ranges(cfg: Config, root: Path) -> list[tuple[int, int]]:
    src = cfg.source
    if isinstance(src, SyntheticSource):
        n = src.images
    elif isinstance(src, GraphsSource):
        n = len(_graph_records(src.path))
    elif isinstance(src, FolderSource):
        n = len(_folder_files(BuildDir(root), cfg))
    else:
        n = len(_offsets(BuildDir(root), cfg))
    return [(r.start, r.stop) for r in ingest_stage.iter_shards(n, cfg.build.shard_size)]


def ingest_unit(b: BuildDir, cfg: Config, inputs: dict) -> UnitOutput:
    src = cfg.source
    start, stop = inputs["start"], inputs["stop"]
    if isinstance(src, SyntheticSource):
        out = ingest_stage.ingest_synthetic(range(start, stop), build_seed=cfg.build.seed, width=src.width,
                                            height=src.height, min_objects=src.min_objects,
                                            max_objects=src.max_objects)
    elif isinstance(src, GraphsSource):
        out = ingest_stage.ingest_graphs(_graph_records(src.path), range(start, stop), images_dir=src.images_dir,
                                         relations_from_geometry=src.relations_from_geometry)
    elif isinstance(src, FolderSource):
        out = ingest_stage.ingest_folder(_folder_files(b, cfg), range(start, stop), root=src.path)
    else:
        from refforge.stages.sources import read_lines

        records = read_lines(_prepared(b, cfg), _offsets(b, cfg), start, stop)
        out = ingest_stage.ingest_graphs(records, range(len(records)), images_dir=src.images_dir, source=src.kind)
    tables: dict[str, list] = {}
    if out.refs:
        tables["expressions"] = _ref_expressions(cfg, out)
    seen: set[str] = set()
    images = []
    for img in out.images:
        if img.record.image_id in seen:
            out.drops.append(Drop(stage="ingest", key=img.record.source_ref or img.record.image_id,
                                  reason="duplicate image", detail=img.record.image_id))
            continue
        seen.add(img.record.image_id)
        b.images.put(img.data, img.ext)
        images.append(img.record)
    return UnitOutput({"images": images, "objects": out.objects, "relations": out.relations, **tables}, out.drops,
                      out.scenes_in)


def _ref_expressions(cfg: Config, out) -> list[Expression]:
    """RefCOCO-style human expressions as positive samples; the level is the target's minimal
    constraint count in the scene graph (targets with no unique path within the bound are dropped)."""
    from refforge.stages import paths as paths_stage

    p = cfg.paths
    levels: dict[str, dict[str, int]] = {}
    boxes = {(o.image_id, o.object_id): o.box for o in out.objects}
    rows = []
    for ref in out.refs:
        image_id, target = ref["image_id"], ref["object_id"]
        if image_id not in levels:
            levels[image_id] = paths_stage.referring_paths(
                out.graphs[image_id], max_hops=p.max_hops, max_constraints=p.max_constraints, max_per_target=1,
                positions=p.positions).levels
        level = levels[image_id].get(target)
        if level is None or not ref["text"].strip():
            out.drops.append(Drop(stage="ingest", key=f"{image_id}/ref/{ref['ref_id']}",
                                  reason="ref target has no unique path, so no level" if level is None
                                  else "empty ref expression"))
            continue
        rows.append(Expression(
            sample_id=stable_key("ref", image_id, target, ref["ref_id"], ref["text"]), image_id=image_id,
            text=ref["text"], polarity="positive", target_object_id=target, gt_box=boxes[(image_id, target)],
            task="refcoco", tasks={"source": "refcoco", "split": str(ref["split"])}, difficulty=level))
    return rows


def graph_keys(inputs: dict) -> list[str]:
    """The work keys whose images/objects/relations make a shard's scene graphs: ingest, plus the
    proposals unit when the build runs that stage."""
    return list(inputs.get("graph") or [inputs["ingest"]])


def read_graphs(b: BuildDir, keys: list[str], objects: pa.Table | None = None
                ) -> tuple[dict[str, SceneGraph], dict[str, dict]]:
    """Scene graphs and image rows (by image_id) of the units with these work keys; ``objects`` is
    their objects table when the caller has read it already."""
    images = b.reader.read("images", keys)
    if objects is None:
        objects = b.reader.read("objects", keys)
    graphs = graphs_from_tables(images, objects, b.reader.read("relations", keys))
    return graphs, {r["image_id"]: r for r in images.to_pylist()}


# -- proposals ----------------------------------------------------------------------------------

_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def proposal_models(cfg: Config) -> tuple[Any, Any]:
    """(tagger, detector) of the ``[proposals]`` config, loaded once per process and config (not per
    shard): model weights are the expensive part of the stage."""
    from refforge.stages import proposals as prop

    p = cfg.proposals
    key = json.dumps(p.model_dump(mode="json"), sort_keys=True)
    with _MODELS_LOCK:
        if key not in _MODELS:
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
            _MODELS[key] = (prop.make_tagger(p.tagger, **topts), prop.make_detector(p.detector, **dopts))
        return _MODELS[key]


def proposals_unit(b: BuildDir, cfg: Config, inputs: dict) -> UnitOutput:
    """Detector objects for the shard's images without a scene graph (every image with
    ``all_images``); relations between them computed from their boxes (``relations_from_geometry``)."""
    from PIL import Image as PILImage

    from refforge.stages import proposals as prop
    from refforge.stages.geometry import compute_relations
    from refforge.stages.graph import GObject

    p = cfg.proposals
    images = b.reader.read("images", [inputs["ingest"]]).to_pylist()
    with_objects = set(b.reader.read("objects", [inputs["ingest"]], columns=["image_id"]).column(0).to_pylist())
    todo = [r for r in images if p.all_images or r["image_id"] not in with_objects]
    out = UnitOutput(items_in=len(todo))
    if not todo:
        return out
    tagger, detector = proposal_models(cfg)
    params = prop.ProposalParams(**{f.name: getattr(p, f.name) for f in fields(prop.ProposalParams)})
    objects: list[Object] = []
    relations: list[Relation] = []
    for start in range(0, len(todo), p.batch_size):
        batch = todo[start:start + p.batch_size]
        pils = []
        for r in batch:
            with PILImage.open(b.images.resolve(r["path"])) as im:
                pils.append(im.convert("RGB"))
        found = prop.propose(pils, tagger, detector, params, vocabulary=p.vocabulary)
        for r, props in zip(batch, found, strict=True):
            if not props:
                out.drops.append(Drop(stage="proposals", key=r["image_id"], reason="no proposals",
                                      detail=r["source_ref"]))
                continue
            gobjs = [GObject(f"det{i}", q.name, tuple(q.box), (), q.origin, q.score) for i, q in enumerate(props)]
            objs, _, drops = ingest_stage.graph_records(r["image_id"], SceneGraph(r["width"], r["height"], gobjs),
                                                        f"proposals:{r['image_id']}")
            out.drops += [d.model_copy(update={"stage": "proposals"}) for d in drops]
            objects += objs
            if p.relations_from_geometry:
                kept = {o.object_id for o in objs}
                relations += [Relation(image_id=r["image_id"], subject_id=g.subject, predicate=g.predicate,
                                       object_id=g.object)
                              for g in compute_relations([g for g in gobjs if g.id in kept], r["width"], r["height"])]
    out.tables = {"objects": objects, "relations": relations}
    out.extra = {"images": len(todo), "proposals": len(objects)}
    return out


# -- describe -------------------------------------------------------------------------------------

_RELATION_TASKS = ("relation", "interaction", "spatial/relationship")


def describe_difficulty(task: str, label_unique: bool) -> int:
    """The level of a described expression (there is no path to count constraints on): L1 when the
    proposal's label is unique among the image's objects (its category alone could refer to it), L2
    when it is not (the description must add what tells it apart), L3 when it is not and the task
    asks for a relation to another object (an anchor plus the target's own words)."""
    if label_unique:
        return 1
    return 3 if task in _RELATION_TASKS else 2


def describe_unit(b: BuildDir, cfg: Config, inputs: dict) -> UnitOutput:
    """Set-of-Mark descriptions of the shard's detector boxes by the VLM, one per requested task,
    kept when the round trip grounds them back on the box (IoU >= ``[describe] iou``)."""
    out = UnitOutput()
    d = cfg.describe
    if d.backend == "offline":
        return out
    from refforge.stages.llm_stages import describe_boxes, vlm_grounder

    # each unit's objects are read once: they make the scene graphs, and the proposals unit's are the boxes
    keys = list(dict.fromkeys(graph_keys(inputs)))
    objects = {k: b.reader.read("objects", [k]) for k in dict.fromkeys([*keys, inputs["proposals"]])}
    graphs, images = read_graphs(b, keys, pa.concat_tables([objects[k] for k in keys]))
    dets = [o for o in objects[inputs["proposals"]].to_pylist() if o["origin"] == "detector"]
    by_image: dict[str, list[dict]] = defaultdict(list)
    for o in dets:
        by_image[o["image_id"]].append(o)
    client = model_client(b, cfg, "vlm")
    grounder = vlm_grounder(client, dialect=d.ground_dialect, stage="describe_ground")
    stage_hash = cfg.stage_hash("describe")
    taxonomy = cfg.paths.taxonomy
    rows: list[Expression] = []
    seen: dict[str, set[str]] = defaultdict(set)
    for image_id, objs in by_image.items():
        img = images[image_id]
        objs = sorted(objs, key=lambda o: (-(o["score"] or 0.0), o["object_id"]))[: d.max_boxes]
        out.items_in += len(objs) * len(d.tasks)
        names = Counter(o.name for o in graphs[image_id].objects)
        boxes = {o["object_id"]: o for o in objs}
        outcomes = describe_boxes(client, b.images.resolve(img["path"]), [(o["object_id"], o["box"]) for o in objs],
                                  d.tasks, width=img["width"], height=img["height"], grounder=grounder,
                                  iou_threshold=d.iou, temperature=d.temperature)
        for oc in outcomes:
            key = f"{image_id}/{oc.box_id}/{oc.category}"
            if not oc.kept:
                out.drops.append(oc.drop.model_copy(update={"key": key}))  # type: ignore[union-attr]
                continue
            norm = " ".join(oc.text.lower().split())  # type: ignore[union-attr]
            if norm in seen[image_id]:
                out.drops.append(Drop(stage="describe", key=key, reason="duplicate description", detail=oc.text))
                continue
            seen[image_id].add(norm)
            o = boxes[oc.box_id]
            path = {"source": "describe", "label": o["name"], "model": oc.model, "prompt": oc.prompt_version,
                    "round_trip_iou": round(oc.iou or 0.0, 4), "grounded_box": list(oc.grounded_box or ())}
            rows.append(Expression(
                sample_id=stable_key("describe", image_id, oc.box_id, oc.category, oc.text, stage_hash),
                image_id=image_id, text=oc.text, polarity="positive", target_object_id=oc.box_id,
                gt_box=tuple(o["box"]), task=oc.category, tasks={taxonomy: oc.category},
                difficulty=describe_difficulty(oc.category, names[o["name"]] == 1),
                path=json.dumps(path, sort_keys=True)))
    out.tables["expressions"] = rows
    out.extra = {"described": len(rows)}
    return out


# -- rewrite (inside the units that write expressions) ----------------------------------------------

def rewrite_rows(b: BuildDir, cfg: Config, rows: list[Expression], queries: list[Node],
                 edits: list[tuple[str, str] | None] | None = None) -> tuple[list[Expression], list[Drop]]:
    """With ``[rewrite] backend = "llm"``: each row's template text rewritten by the LLM and checked
    against the row's own path (``queries``; for a text negative its edited path and ``edits``). A kept
    rewrite replaces ``text``; a rejected one leaves the template text and becomes a drop (stage
    "rewrite", the reason). ``template_text`` always keeps the template. Offline: rows unchanged."""
    if cfg.rewrite.backend == "offline" or not rows:
        return rows, []
    from refforge.stages.llm_stages import RewriteItem, rewrite_expressions

    edits = edits or [None] * len(rows)
    items = [RewriteItem(r.sample_id, r.text, q, e) for r, q, e in zip(rows, queries, edits, strict=True)]
    outcomes = rewrite_expressions(model_client(b, cfg, "llm"), items, seed=cfg.build.seed,
                                   temperature=cfg.rewrite.temperature)
    out, drops = [], []
    for row, o in zip(rows, outcomes, strict=True):
        if o.kept and o.text != row.text:
            row = row.model_copy(update={"text": o.text})
        elif o.drop is not None:
            drops.append(o.drop)
        out.append(row)
    return out, drops


# -- paths --------------------------------------------------------------------------------------

def paths_unit(b: BuildDir, cfg: Config, inputs: dict) -> UnitOutput:
    from refforge.stages import paths as paths_stage
    from refforge.stages.descriptive import descriptive_variant
    from refforge.stages.records import expressions_for_graph

    p = cfg.paths
    graphs, _ = read_graphs(b, graph_keys(inputs))
    stage_hash = cfg.stage_hash("paths")
    selection = paths_stage.TargetSelection(min_area_frac=p.min_area_frac, max_area_frac=p.max_area_frac,
                                            blocklist=tuple(p.blocklist), drop_border_cut=p.drop_border_cut)
    out = UnitOutput()
    expressions: list[Expression] = []
    before: dict[str, Counter] = defaultdict(Counter)
    after: dict[str, Counter] = defaultdict(Counter)
    with gc_paused():  # pure stage code, no reference cycles: see refforge.gcpause
        for image_id, graph in graphs.items():
            out.items_in += len(graph.objects)
            seed = int(stable_key(cfg.build.seed, image_id, length=8), 16)
            res = paths_stage.referring_paths(
                graph, max_hops=p.max_hops, max_constraints=p.max_constraints, max_per_target=p.max_per_target,
                seed=seed, positions=p.positions, selection=selection)
            chosen = list(res.paths)
            if p.descriptive_share > 0:
                for path in res.paths:
                    pick = int(stable_key("descriptive", seed, path.target_id, path.text, length=8), 16) / 16**8
                    if path.query.relations and pick < p.descriptive_share:
                        d = descriptive_variant(graph, path, seed=seed)
                        if d is not None:
                            chosen.append(d)
            rows = expressions_for_graph(image_id, graph, chosen, stage_hash, primary=p.taxonomy)
            rows, rewrite_drops = rewrite_rows(b, cfg, rows, [c.query for c in chosen])
            expressions += rows
            out.drops += rewrite_drops
            out.drops += [Drop(stage="paths", key=f"{image_id}/{oid}", reason=reason) for oid, reason in res.drops]
            for kind, counter in res.counts_before.items():
                before[kind].update(counter)
            for kind, counter in res.counts_after.items():
                after[kind].update(counter)
    out.tables["expressions"] = expressions
    out.extra = {"counts_before": {k: dict(v) for k, v in before.items()},
                 "counts_after": {k: dict(v) for k, v in after.items()}}
    return out


# -- negatives (text) -----------------------------------------------------------------------------

def _is_complete(cfg: Config) -> bool:
    """Synthetic scene graphs annotate every object with every attribute family; real ones do not."""
    return isinstance(cfg.source, SyntheticSource)


def negatives_text_unit(b: BuildDir, cfg: Config, inputs: dict) -> UnitOutput:
    from refforge.stages import negatives as neg
    from refforge.stages.taxonomy import tasks_for

    graphs, _ = read_graphs(b, graph_keys(inputs))
    positives = b.reader.read("expressions", [inputs["paths"], *inputs.get("described", ())]).to_pylist()
    stage_hash = cfg.stage_hash("negatives_text")
    primary = cfg.paths.taxonomy
    rows: list[Expression] = []
    queries: list[Node] = []
    edits: list[tuple[str, str]] = []
    counts: Counter = Counter()
    skipped = 0
    indexes: dict[str, Any] = {}
    backend = neg.DEFAULT_BACKEND
    pos_queries = [_query_of(p) for p in positives]
    if cfg.negatives_text.backend == "llm":
        from refforge.stages.llm_stages import negative_backend

        backend = negative_backend(model_client(b, cfg, "llm"))
        backend.prefetch([q for q in pos_queries if q is not None])
    with gc_paused():  # as in paths_unit
        for pos, query in zip(positives, pos_queries, strict=True):
            if query is None:
                skipped += 1  # a described or human expression: no path to edit
                continue
            graph = graphs[pos["image_id"]]
            if pos["image_id"] not in indexes:
                indexes[pos["image_id"]] = neg.NegativeIndex(graph)
            cands = neg.text_negatives(graph, query, pos["template_text"], target_id=pos["target_object_id"],
                                       seed=int(stable_key(cfg.build.seed, pos["sample_id"], length=8), 16),
                                       per_type=cfg.negatives_text.per_type, complete_graph=_is_complete(cfg),
                                       index=indexes[pos["image_id"]], backend=backend)
            for c in cands:
                tasks = tasks_for(c.query, graph, polarity="negative", negative_type=c.negative_type)
                path = {**c.query.to_json(), "hops": c.query.hops, "constraints": c.query.constraint_count,
                        "edit": c.detail}
                rows.append(Expression(
                    sample_id=stable_key("neg", pos["sample_id"], c.text, c.negative_type, stage_hash),
                    image_id=pos["image_id"], text=c.text, template_text=c.template_text,
                    template_name=pos["template_name"], polarity="negative", task=tasks.get(primary), tasks=tasks,
                    difficulty=pos["difficulty"], hops=c.query.hops, path=json.dumps(path, sort_keys=True),
                    negative_type=c.negative_type, negative_level=c.negative_level, negative_source="text",
                    positive_id=pos["sample_id"], needs_review=c.needs_review))
                queries.append(c.query)
                edits.append((c.negative_type, c.detail))
                counts[f"{c.negative_type}/{c.negative_level}"] += 1
    drops = backend.take_drops() if hasattr(backend, "take_drops") else []
    rows, rewrite_drops = rewrite_rows(b, cfg, rows, queries, edits)
    extra: dict[str, Any] = {"candidates": dict(counts)}
    if skipped:
        extra["skipped_without_path"] = skipped
    return UnitOutput({"negative_candidates": rows}, drops + rewrite_drops, len(positives), extra)


def _query_of(row: dict) -> Node | None:
    """The referring path of an expression row; None when it has none (described or human expressions)."""
    if not row.get("path"):
        return None
    path = json.loads(row["path"])
    return Node.from_json(path) if "category" in path else None


def refine_all(b: BuildDir, cfg: Config, shards: list[dict[str, str]]) -> dict[str, UnitOutput]:
    """Blind-text refinement over every shard's candidates; the kept ones become expressions."""
    from refforge.stages import refine as refine_stage

    cands = {s["key"]: b.reader.read("negative_candidates", [s["negatives_text"]]).to_pylist() for s in shards}
    positives = b.reader.read("expressions", [s["paths"] for s in shards], columns=["text", "image_id"])
    flat = [(s["key"], r) for s in shards for r in cands[s["key"]]]
    ncfg = cfg.negatives_text
    outputs = {s["key"]: UnitOutput(items_in=len(cands[s["key"]])) for s in shards}
    if not ncfg.refine or not flat or not positives.num_rows:
        for key, r in flat:
            outputs[key].tables.setdefault("expressions", []).append(Expression(**r))
        return outputs
    res = refine_stage.refine(positives.column("text").to_pylist(), positives.column("image_id").to_pylist(),
                              [r["text"] for _, r in flat], [r["image_id"] for _, r in flat],
                              [r["negative_type"] for _, r in flat], target_auroc=ncfg.target_auroc,
                              max_rounds=ncfg.max_rounds, seed=cfg.build.seed)
    kept = set(res.kept)
    rejected = dict(res.rejected)
    summary = {"auroc_before": res.auroc_before, "auroc_after": res.auroc_after, "rounds": res.rounds,
               "kept": len(kept), "rejected": len(rejected)}
    for i, (key, r) in enumerate(flat):
        out = outputs[key]
        out.extra = summary
        out.tables.setdefault("scores", []).append(Score(subject_id=r["sample_id"], filter="blind_text",
                                                          value=float(res.scores[i]), passed=i in kept))
        if i in kept:
            out.tables.setdefault("expressions", []).append(Expression(**r))
        else:
            out.drops.append(Drop(stage="refine", key=r["sample_id"], reason="separable by a blind text model",
                                  detail=rejected.get(i)))
    return outputs


# -- negatives (image) ----------------------------------------------------------------------------

def negatives_image_unit(b: BuildDir, cfg: Config, inputs: dict) -> UnitOutput:
    from refforge.stages import flip
    from refforge.stages.ingest import graph_records
    from refforge.stages.taxonomy import tasks_for

    out = UnitOutput()
    if not cfg.negatives_image.flip:
        return out
    graphs, images = read_graphs(b, graph_keys(inputs))
    positives = b.reader.read("expressions", [inputs["paths"]]).to_pylist()
    out.items_in = len(positives)
    by_image: dict[str, list[tuple[dict, Node, str]]] = defaultdict(list)
    for pos in positives:
        query = Node.from_json(json.loads(pos["path"]))
        level = flip.horizontal_level(query)
        if level is not None:
            by_image[pos["image_id"]].append((pos, query, level))
    stage_hash = cfg.stage_hash("negatives_image")
    rows: dict[str, list[Record]] = {"images": [], "objects": [], "relations": [], "expressions": []}
    for image_id, items in by_image.items():
        img = images[image_id]
        data, ext, mgraph, mspec = flip.mirrored_image(b.images.read(img["path"]), img["source"], img["spec"],
                                                       graphs[image_id])
        negs = [(pos, q, lvl) for pos, q, lvl in items if flip.is_flip_negative(mgraph, q)]
        skipped = len(items) - len(negs)
        if skipped:
            out.drops.append(Drop(stage="negatives_image", key=image_id, reason="flip leaves a match",
                                  detail=f"{skipped} horizontal expressions still refer to an object when mirrored"))
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
        for pos, q, lvl in negs:
            tasks = tasks_for(q, mgraph, polarity="negative", negative_type="flip")
            rows["expressions"].append(Expression(
                sample_id=stable_key("flip", pos["sample_id"], mid, stage_hash), image_id=mid, text=pos["text"],
                template_text=pos["template_text"], template_name=pos["template_name"], polarity="negative",
                task=tasks.get(cfg.paths.taxonomy), tasks=tasks, difficulty=pos["difficulty"], hops=pos["hops"],
                path=pos["path"], negative_type="flip", negative_level=lvl, negative_source="image",
                positive_id=pos["sample_id"]))
    out.tables = rows
    return out


# -- reasoning traces -----------------------------------------------------------------------------

def cot_unit(b: BuildDir, cfg: Config, inputs: dict) -> UnitOutput:
    from refforge.stages import cot

    graphs, images = read_graphs(b, [*graph_keys(inputs), inputs["negatives_image"]])
    samples = b.reader.read("expressions", inputs["expressions"]).to_pylist()
    out = UnitOutput(items_in=len(samples))
    if cfg.cot.backend == "vlm":
        return _vlm_cot(b, cfg, samples, graphs, images, out)
    traces: list[CotTrace] = []
    contexts: dict[str, Any] = {}  # one TraceContext per image (samples come image by image)
    with gc_paused():  # as in paths_unit
        for s in samples:
            graph = graphs.get(s["image_id"])
            if graph is None or not s["path"]:
                out.drops.append(Drop(stage="cot", key=s["sample_id"], reason="no scene graph for the sample"))
                continue
            query = _query_of(s)
            if query is None:
                out.drops.append(Drop(stage="cot", key=s["sample_id"], reason="no referring path for the offline trace",
                                      detail="described or human expressions need cot.backend = 'vlm'"))
                continue
            ctx = contexts.get(s["image_id"])
            if ctx is None:
                ctx = contexts[s["image_id"]] = cot.TraceContext(graph)
            for t in cot.traces_for_sample(graph, query, s["polarity"], s["target_object_id"], s["gt_box"],
                                           k=cfg.cot.k, seed=int(stable_key(cfg.build.seed, s["sample_id"], length=8), 16),
                                           ctx=ctx, steps=False):
                traces.append(CotTrace(sample_id=s["sample_id"], trace=t.text, answer_box=t.answer_box, iou=t.iou,
                                       verdict=t.verdict, selected=t.selected, model=cot.MODEL))
    out.tables["cot_traces"] = traces
    return out


def _vlm_cot(b: BuildDir, cfg: Config, samples: list[dict], graphs, images, out: UnitOutput) -> UnitOutput:
    """K hinted traces per sample from the VLM, verified against the ground truth, best selected."""
    from refforge.stages.llm_stages import CotSample, llm_traces

    c = cfg.cot
    batch = []
    for s in samples:
        img = images.get(s["image_id"])
        if img is None:
            out.drops.append(Drop(stage="cot", key=s["sample_id"], reason="no image row for the sample"))
            continue
        query = _query_of(s)
        batch.append(CotSample(sample_id=s["sample_id"], text=s["text"], polarity=s["polarity"],
                               gt_box=s["gt_box"], image=b.images.resolve(img["path"]), width=img["width"],
                               height=img["height"], graph=graphs.get(s["image_id"]), query=query,
                               target_id=s["target_object_id"]))
    judge_client = model_client(b, cfg, "llm") if c.judge == "llm" else None
    results = llm_traces(model_client(b, cfg, "vlm"), batch, k=c.k, judge=c.judge, dialect=c.dialect,
                         temperature=c.temperature, seed=cfg.build.seed, judge_client=judge_client)
    rows = []
    for cands in results:
        out.drops += cands.drops
        for t in cands:
            rows.append(CotTrace(sample_id=cands.sample_id, trace=t.text, answer_box=t.answer_box, iou=t.iou,
                                 verdict=t.verdict, selected=t.selected, model=t.model))
    out.tables["cot_traces"] = rows
    return out


UNIT_FUNCTIONS: dict[str, Callable[[BuildDir, Config, dict], UnitOutput]] = {
    "ingest": ingest_unit,
    "proposals": proposals_unit,
    "paths": paths_unit,
    "describe": describe_unit,
    "negatives_text": negatives_text_unit,
    "negatives_image": negatives_image_unit,
    "cot": cot_unit,
}


def summarise_extra(stage: str, extras: list[dict[str, Any]]) -> dict[str, Any]:
    if stage == "paths":
        from refforge.stages.paths import entropy

        out = {}
        for when in ("counts_before", "counts_after"):
            merged: dict[str, Counter] = defaultdict(Counter)
            for e in extras:
                for kind, counts in e.get(when, {}).items():
                    merged[kind].update(counts)
            out[when.replace("counts", "entropy_bits")] = {k: round(entropy(v), 4) for k, v in merged.items()}
        return out
    if stage == "negatives_text":
        return {"candidates": dict(sum((Counter(e.get("candidates", {})) for e in extras), Counter())),
                "skipped_without_path": sum(e.get("skipped_without_path", 0) for e in extras)}
    if stage == "refine":
        return {"blind_text": next((e for e in extras if e), {})}
    return {}


def model_ids(cfg: Config) -> dict[str, str]:
    neg = cfg.llm.model if cfg.negatives_text.backend == "llm" and cfg.llm else "offline-lexicon"
    cot = cfg.vlm.model if cfg.cot.backend == "vlm" and cfg.vlm else "offline-graph-walk"
    out = {"ingest": cfg.source.kind, "paths": cfg.paths.backend, "negatives_text": neg,
           "blind_text_classifier": "bag-of-ngrams logistic regression (numpy)", "cot": cot,
           "rewrite": cfg.llm.model if cfg.rewrite.backend == "llm" and cfg.llm else "template"}
    stages = cfg.build.stages
    if "proposals" in stages:
        p = cfg.proposals
        out["proposals"] = f"detector={p.detector_model or p.detector}, tagger={p.tagger_model or p.tagger}"
    if "describe" in stages:
        out["describe"] = cfg.vlm.model if cfg.describe.backend == "vlm" and cfg.vlm else "offline (none)"
    return out


def model_prompts(cfg: Config) -> dict[str, str]:
    """``{stage: "<template>@<sha256>"}`` of the prompts the build's model stages send (run provenance)."""
    stages = cfg.build.stages
    used = {"rewrite": cfg.rewrite.backend == "llm" and ("paths" in stages),
            "negatives": cfg.negatives_text.backend == "llm" and "negatives_text" in stages,
            "describe": cfg.describe.backend == "vlm" and "describe" in stages,
            "ground": cfg.describe.backend == "vlm" and "describe" in stages,
            "cot": cfg.cot.backend == "vlm" and "cot" in stages,
            "judge": cfg.cot.judge == "llm" and "cot" in stages}
    if not any(used.values()):
        return {}
    from refforge.stages.llm_stages import prompt_version

    return {name: prompt_version(name) for name, on in used.items() if on}
