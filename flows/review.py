"""Human review in Label Studio: push a batch of a build's samples, pull the decisions, show the status.

* :func:`push` chooses the next batch (:mod:`refforge.stages.review_select`), creates or reuses the
  project, connects a local-files storage to ``<build>/images`` (never a copy of the image store) and
  imports the samples as tasks with the proposed box as a prediction, in batches of 500. It is
  idempotent: the server's own tasks (``data.sample_id``) say what is already in the project and are
  never sent again. The batch chosen is kept in ``state/review/push-<project id>.json`` until the
  server accepted all of it: the re-run of an interrupted push (same parameters) sends only what that
  batch still misses; a finished push followed by the same command chooses the next batch. A ``review_batches`` row
  per sample is written only after the server accepted its batch (a push killed between the two has
  its rows written by the next push, with ``strategy="recovered"``).
* :func:`pull` turns every annotation into a ``reviews`` row (decision, fixed box in pixels of the
  stored image, fixed text, times, lead time); the latest annotation of each annotator on a task
  counts; cancelled (skipped) annotations are ignored; a box outside the image, an annotation without
  a decision or a task of a sample the build does not know becomes a ``drops`` row (stage ``review``).
  A pull writes only rows the build does not hold yet: pulling twice writes nothing new.
* :func:`status` counts per project and stratum (task, difficulty, polarity, negative type) what was
  pushed, reviewed and pending, from the build's tables alone (no server needed).
* :func:`review_cycle` is the Prefect flow ``refforge-review``: push the next batch, pull, agreement.

The server's URL and token come from the arguments or the environment (``REFFORGE_LS_URL``,
``REFFORGE_LS_TOKEN``); the token reaches no table, run file or log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from prefect import flow

from refforge.config import Config
from refforge.review import labelstudio as ls
from refforge.review.server import ReviewError
from refforge.schemas import Drop, Review, ReviewBatch, check_box
from refforge.stages.review_select import STRATEGIES, select_batch, stratum, stratum_label
from refforge.stages.review_stats import agreement
from refforge.storage import BuildDir, new_run_id, strict_json
from refforge.storage.atomic import atomic_write_bytes

__all__ = ["BATCH_SIZE", "PullResult", "PushResult", "pull", "push", "review_cycle", "status"]

BATCH_SIZE = 500
STAGE = "review"
_EXPR_COLUMNS = ["sample_id", "image_id", "text", "polarity", "gt_box", "target_object_id", "task", "difficulty",
                 "negative_type", "negative_level", "needs_review"]


@dataclass
class PushResult:
    project: str
    project_id: int
    strategy: str
    batch_id: str
    selected: int = 0
    sent: int = 0
    already_in_project: int = 0
    recovered: int = 0
    """tasks the server held without a review_batches row (a push killed after an import): rows written now"""
    resumed: bool = False
    """an interrupted push with the same parameters was completed (its own batch, nothing new chosen)"""
    task_ids: list[int] = field(default_factory=list)


@dataclass
class PullResult:
    project: str
    project_id: int
    tasks: int = 0
    annotations: int = 0
    cancelled: int = 0
    rows_written: int = 0
    rows_known: int = 0
    drops_written: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers

def _open(build: str | os.PathLike) -> BuildDir:
    try:
        return BuildDir.open(Path(build))
    except FileNotFoundError as e:
        raise ReviewError(str(e)) from None


@contextlib.contextmanager
def _review_lock(b: BuildDir) -> Iterator[None]:
    """One push or pull at a time on a build (two at once could send a sample twice)."""
    path = b.state_dir / "review.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReviewError(f"another review push or pull is running on {b.root}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def _safe_url(url: str) -> str:
    """The URL without user info, query or fragment: what may be written down."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    netloc = f"{host}:{p.port}" if p.port else host
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path.rstrip("/"), "", ""))


def _connect(url: str | None, token: str | None, client: Any = None,
             files_root: str | os.PathLike | None = None) -> Any:
    """A checked client (server up, token right) or a one-line :class:`ReviewError`; nothing written."""
    if client is None:
        client = ls.connect(url, token, files_root=files_root)
    client.check()
    return client


def _attr(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _time(value: Any) -> dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        t = value
    else:
        t = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _key_hash(parts: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _expressions(b: BuildDir) -> list[dict[str, Any]]:
    t = b.reader.read("expressions", columns=_EXPR_COLUMNS)
    return t.to_pylist()


def _images(b: BuildDir) -> dict[str, dict[str, Any]]:
    t = b.reader.read("images", columns=["image_id", "path", "width", "height"])
    return {r["image_id"]: r for r in t.to_pylist()}


def _latest_test_ids(b: BuildDir) -> set[str] | None:
    """The test split of the latest export recorded in the build (``splits``), or None without one."""
    keys = b.reader.work_keys("splits")
    if not keys:
        return None
    # shard names start with the run id, which starts with the UTC time of the export
    latest = keys[max(keys, key=lambda p: (p.name, p.stat().st_mtime_ns))]
    rows = b.reader.read("splits", work_keys=[latest]).to_pylist()
    return {r["sample_id"] for r in rows if r["split"] == "test"}


def _splits_of(b: BuildDir, split: str) -> set[str]:
    keys = b.reader.work_keys("splits")
    if not keys:
        raise ReviewError(f"--split {split} needs an export of {b.root}: run `refforge export` first")
    latest = keys[max(keys, key=lambda p: (p.name, p.stat().st_mtime_ns))]
    rows = b.reader.read("splits", work_keys=[latest]).to_pylist()
    ids = {r["sample_id"] for r in rows if r["split"] == split}
    if not ids:
        names = sorted({r["split"] for r in rows})
        raise ReviewError(f"the latest export of {b.root} has no {split!r} split (it has {', '.join(names)})")
    return ids


def model_version(b: BuildDir) -> str:
    """``<build name>-<config hash[:12]>``: the predictions' model version names the build."""
    return f"{b.config(Config).build.name}-{b.config_hash(Config)[:12]}"


def _project_id(project: Any) -> int:
    pid = _attr(project, "id")
    if pid is None:
        raise ReviewError(f"Label Studio returned a project without an id: {project!r}")
    return int(pid)


def _task_sample(task: Any) -> str | None:
    data = _attr(task, "data") or {}
    sid = data.get("sample_id") if isinstance(data, Mapping) else None
    return str(sid) if sid is not None else None


def _server_samples(client: Any, project_id: int) -> dict[str, int]:
    """sample_id -> task id of the tasks the project holds (the first task where one was sent twice)."""
    out: dict[str, int] = {}
    for t in client.tasks(project_id):
        sid = _task_sample(t)
        if sid is not None and sid not in out:
            out[sid] = int(_attr(t, "id"))
    return out


def _batches(b: BuildDir) -> list[dict[str, Any]]:
    return b.reader.read("review_batches").to_pylist()


def _write_batch_rows(b: BuildDir, rows: list[ReviewBatch], work_key: str) -> None:
    if rows and not b.reader.has_work("review_batches", work_key):
        _, bad = b.writer(new_run_id()).write("review_batches", rows, work_key=work_key, stage=STAGE)
        if bad:  # our own rows: a failure here is a bug, not bad input
            raise RuntimeError(f"review_batches rows failed validation: {bad[0].reason} {bad[0].detail}")


# ------------------------------------------------------------------------------------------------ push

def push(
    build: str | os.PathLike,
    project: str,
    *,
    size: int | None = 100,
    strategy: str = "needs_review",
    split: str | None = None,
    overlap: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    url: str | None = None,
    token: str | None = None,
    files_root: str | os.PathLike | None = None,
    batch: int = BATCH_SIZE,
    client: Any = None,
) -> PushResult:
    """Send the next batch of ``build``'s samples to the Label Studio project ``project``.

    ``files_root`` (else ``REFFORGE_LS_FILES_ROOT``) is the folder the server serves local files from
    (``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``); the build must lie under it. ``overlap``: annotators
    per task, through the project's own setting (``maximum_annotations``); None leaves the project's
    setting as it is (a new project: one). Raises :class:`ReviewError`
    (one line) when the server cannot be used or the input is wrong; nothing is written then.
    """
    if strategy not in STRATEGIES:
        raise ReviewError(f"unknown --strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if overlap is not None and (int(overlap) != overlap or overlap < 1):
        raise ReviewError(f"--overlap must be a positive integer, got {overlap!r}")
    if size is not None and (int(size) != size or size < 0):
        raise ReviewError(f"--size must be a non-negative integer, got {size!r}")
    if int(batch) != batch or batch < 1:
        raise ReviewError(f"the import batch size must be a positive integer, got {batch!r}")
    if not project or not project.strip():
        raise ReviewError("--project must name a project")
    b = _open(build)
    exprs = _expressions(b)
    if not exprs:
        raise ReviewError(f"{b.root} has no expressions to review (did the build run the paths stage?)")
    images = _images(b)
    test_ids = _latest_test_ids(b) if strategy == "test" else None
    if strategy == "test" and test_ids is None:
        raise ReviewError(f"--strategy test needs an export of {b.root}: run `refforge export` first")
    only = _splits_of(b, split) if split else None
    version = model_version(b)

    client = _connect(url, token, client, files_root)
    root = files_root or getattr(client, "files_root", None)
    if not root:
        raise ReviewError(f"the files root of {client.url} is unknown: pass --files-root or set REFFORGE_LS_FILES_ROOT "
                          "(the folder the server serves local files from; `refforge review server status` "
                          "shows it)")
    root = Path(root).expanduser().resolve()
    images_dir = (b.root / "images").resolve()
    if images_dir == root or root not in images_dir.parents:
        raise ReviewError(f"the build's images {images_dir} are not under the files root {root} of {client.url}: "
                          "move the build under it, or start the server with a --files-root above the build")
    server_url = _safe_url(client.url)
    by_sid = {e["sample_id"]: e for e in exprs}
    with _review_lock(b):
        proj = client.project(project)
        pid = _project_id(proj)
        if overlap is not None:
            _set_overlap(client, proj, int(overlap))
            proj = {**proj, "maximum_annotations": int(overlap)}
        overlap = int(proj.get("maximum_annotations") or 1)
        in_project = _server_samples(client, pid)
        now = dt.datetime.now(dt.UTC)
        batch_id = f"{now.strftime('%Y%m%dT%H%M%S')}-{os.urandom(3).hex()}"
        res = PushResult(project, pid, strategy, batch_id, already_in_project=len(in_project))

        plan_path = b.state_dir / "review" / f"push-{pid}.json"
        plan = _read_plan(plan_path)
        params = {"strategy": strategy, "size": size, "split": split, "fraction": fraction, "seed": seed}
        planned = set(plan["samples"]) if plan else set()

        # tasks the server accepted whose rows a killed push never wrote
        recorded = {r["sample_id"] for r in _batches(b) if r["project_id"] == pid}
        missing = sorted(s for s in in_project if s not in recorded and s in by_sid)
        if missing:
            rows = [ReviewBatch(project=project, project_id=pid, task_id=str(in_project[s]), sample_id=s,
                                strategy=plan["params"]["strategy"] if s in planned else "recovered",
                                batch_id=plan["batch_id"] if s in planned else batch_id, time=now,
                                overlap=int(overlap), url=server_url) for s in missing]
            _write_batch_rows(b, rows, f"review-push-{pid}-recovered-{_key_hash(missing)}")
            res.recovered = len(missing)

        if plan is not None and plan["params"] == params:
            # the same push, interrupted: send what its batch still misses, nothing new
            batch_id = res.batch_id = plan["batch_id"]
            chosen = [s for s in plan["samples"] if s not in in_project and s in by_sid]
            res.resumed = True
        else:
            chosen = select_batch(exprs, size=size, strategy=strategy, already=set(in_project), test_ids=test_ids,
                                  only=only, fraction=fraction, seed=seed)
        res.selected = len(chosen)
        if not chosen:
            plan_path.unlink(missing_ok=True)
            return res
        if not res.resumed:
            atomic_write_bytes(plan_path, strict_json({"params": params, "batch_id": batch_id, "samples": chosen,
                                                       "created": now.isoformat()}).encode())
        tasks = []
        for sid in chosen:
            e = by_sid[sid]
            img = images.get(e["image_id"])
            if img is None:
                raise ReviewError(f"sample {sid} uses image {e['image_id']}, which is not in the build's images table")
            tasks.append(ls.task_payload(e, img, ls.image_url(b.root / img["path"], root), version))
        client.connect_storage(pid, images_dir, files_root=root)

        def accepted(ids: list[int], part: Sequence[dict]) -> None:
            """The server accepted a batch: its rows now (a later batch may fail)."""
            t = dt.datetime.now(dt.UTC)
            rows = [ReviewBatch(project=project, project_id=pid, task_id=str(tid), sample_id=task["data"]["sample_id"],
                                strategy=strategy, batch_id=batch_id, time=t, overlap=int(overlap), url=server_url)
                    for tid, task in zip(ids, part, strict=True)]
            _write_batch_rows(b, rows, f"review-push-{pid}-{batch_id}-{_key_hash([r.sample_id for r in rows])}")
            res.sent += len(rows)
            res.task_ids.extend(int(x) for x in ids)

        client.import_tasks(pid, tasks, batch=int(batch), on_batch=accepted)
        plan_path.unlink(missing_ok=True)
    return res


def _read_plan(path: Path) -> dict[str, Any] | None:
    """An unfinished push of the project (what it chose, with which parameters), or None."""
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a damaged plan: choose anew (the server's tasks still say what is in the project)
    ok = isinstance(plan, dict) and isinstance(plan.get("params"), dict) and isinstance(plan.get("samples"), list)
    return plan if ok and isinstance(plan.get("batch_id"), str) else None


def _set_overlap(client: Any, proj: Mapping[str, Any], overlap: int) -> None:
    """Annotators per task through Label Studio's own setting: ``maximum_annotations`` over every task
    (``overlap_cohort_percentage`` 100); changed only where it differs."""
    if proj.get("maximum_annotations") == overlap and (overlap == 1 or proj.get("overlap_cohort_percentage") == 100):
        return
    with client._errors(f"set the project's overlap to {overlap} annotators"):
        client.sdk.projects.update(id=int(proj["id"]), maximum_annotations=overlap, overlap_cohort_percentage=100)


# ------------------------------------------------------------------------------------------------ pull

def _annotator(ann: Mapping[str, Any]) -> str:
    """The annotator's email (``completed_by_email``, filled in by :meth:`Client.tasks`), else ``user-<id>``."""
    email = ann.get("completed_by_email")
    if email:
        return str(email)
    who = ann.get("completed_by")
    if isinstance(who, Mapping):
        return str(who.get("email") or f"user-{who.get('id')}")
    return f"user-{who}"


def _latest_per_annotator(annotations: Sequence[Any]) -> tuple[dict[str, Any], int]:
    """annotator -> their latest annotation (by updated time, then id), and how many were cancelled."""
    latest: dict[str, tuple] = {}
    cancelled = 0
    for a in annotations:
        if _attr(a, "was_cancelled"):
            cancelled += 1
            continue
        who = _annotator(a)
        k = (_time(_attr(a, "updated_at")) or _time(_attr(a, "created_at")) or dt.datetime.min.replace(tzinfo=dt.UTC),
             int(_attr(a, "id") or 0))
        if who not in latest or k > latest[who][0]:
            latest[who] = (k, a)
    return {w: v[1] for w, v in latest.items()}, cancelled


def pull(
    build: str | os.PathLike,
    project: str,
    *,
    url: str | None = None,
    token: str | None = None,
    client: Any = None,
) -> PullResult:
    """Bring the annotations of project ``project`` into ``build``'s ``reviews`` table (see the module)."""
    b = _open(build)
    exprs = {e["sample_id"]: e for e in _expressions(b)}
    images = _images(b)
    client = _connect(url, token, client)
    with _review_lock(b):
        proj = client.find_project(project)
        if proj is None:
            raise ReviewError(f"Label Studio at {client.url} has no project {project!r}; push to it first")
        pid = _project_id(proj)
        res = PullResult(project, pid)
        rows: list[Review] = []
        drops: list[Drop] = []
        for task in client.tasks(pid):
            res.tasks += 1
            tid = int(_attr(task, "id"))
            anns = list(_attr(task, "annotations") or [])
            res.annotations += len(anns)
            latest, cancelled = _latest_per_annotator(anns)
            res.cancelled += cancelled
            if not latest:
                continue
            sid = _task_sample(task)
            e = exprs.get(sid) if sid is not None else None
            if e is None:
                drops.append(Drop(stage=STAGE, key=str(sid), reason="unknown_task",
                                  detail=f"project {project!r} task {tid}: sample {sid!r} is not in the build"))
                continue
            img = images.get(e["image_id"])
            if img is None:
                drops.append(Drop(stage=STAGE, key=sid, reason="unknown_image",
                                  detail=f"project {project!r} task {tid}: image {e['image_id']} is not in the build"))
                continue
            w, h = int(img["width"]), int(img["height"])
            for who, ann in sorted(latest.items()):
                aid = _attr(ann, "id")
                where = f"project {project!r} task {tid} annotation {aid} by {who}"
                try:
                    decision, box, text = ls.read_annotation(ann, w, h)
                except ValueError as err:
                    drops.append(Drop(stage=STAGE, key=sid, reason="unreadable_annotation", detail=f"{where}: {err}"))
                    continue
                if decision is None:
                    drops.append(Drop(stage=STAGE, key=sid, reason="no_decision", detail=where))
                    continue
                if box is not None:
                    try:
                        box = check_box(box, (w, h), tol=0.5)
                    except ValueError as err:
                        drops.append(Drop(stage=STAGE, key=sid, reason="box_outside_image",
                                          detail=f"{where}: {err}"))
                        continue
                    box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
                created = _time(_attr(ann, "created_at"))
                updated = _time(_attr(ann, "updated_at")) or created
                if updated is None:
                    drops.append(Drop(stage=STAGE, key=sid, reason="no_time", detail=where))
                    continue
                lead = _attr(ann, "lead_time")
                try:
                    rows.append(Review(
                        sample_id=sid, annotator=who, decision=decision, fixed_box=box,
                        fixed_text=text if text else None, task_id=str(tid), time=updated, created=created,
                        updated=updated, lead_time_s=float(lead) if lead is not None else None, project=project,
                        annotation_id=str(aid) if aid is not None else None))
                except ValueError as err:  # pydantic's ValidationError is one
                    detail = " ".join(str(err).split())[:300]
                    drops.append(Drop(stage=STAGE, key=sid, reason="invalid_review", detail=f"{where}: {detail}"))

        known = {(r["sample_id"], r["annotator"], _time(r["time"])) for r in
                 b.reader.read("reviews", columns=["sample_id", "annotator", "time"]).to_pylist()}
        new = [r for r in rows if (r.sample_id, r.annotator, r.time) not in known]
        new = list({(r.sample_id, r.annotator, r.time): r for r in new}.values())
        res.rows_known = len(rows) - len(new)
        all_drops = b.reader.read("drops")
        old_drops = {(d["stage"], d["key"], d["reason"], d["detail"]) for d in
                     all_drops.filter(pc.equal(all_drops["stage"], STAGE)).to_pylist()}
        drops = [d for d in dict.fromkeys(drops) if (d.stage, d.key, d.reason, d.detail) not in old_drops]
        writer = b.writer(new_run_id())
        if new:
            key = "review-pull-" + _key_hash(sorted((r.sample_id, r.annotator, r.time.isoformat()) for r in new))
            if not b.reader.has_work("reviews", key):
                _, bad = writer.write("reviews", new, work_key=key, stage=STAGE)
                drops += bad
                res.rows_written = len(new) - len(bad)
        if drops:
            key = "review-pull-drops-" + _key_hash(sorted((d.key, d.reason, d.detail or "") for d in drops))
            if not b.reader.has_work("drops", key):
                writer.write("drops", drops, work_key=key, stage=STAGE)
                res.drops_written = len(drops)
        res.drop_reasons = dict(Counter(d.reason for d in drops))
    return res


# ------------------------------------------------------------------------------------------------ status

def status(build: str | os.PathLike) -> list[dict[str, Any]]:
    """Per project and stratum: ``pushed`` samples, ``reviewed`` (at least one decision from that
    project), ``pending`` (pushed, not reviewed yet) and ``reviews`` (rows, all annotators).

    Read from the build's tables alone; sorted by project, then stratum."""
    b = _open(build)
    exprs = {e["sample_id"]: e for e in _expressions(b)}
    pushed: dict[str, set[str]] = defaultdict(set)
    for r in _batches(b):
        pushed[r["project"]].add(r["sample_id"])
    reviewed: dict[str, Counter] = defaultdict(Counter)
    for r in b.reader.read("reviews").to_pylist():
        projects = [r["project"]] if r.get("project") else [p for p, s in pushed.items() if r["sample_id"] in s]
        for p in projects:
            reviewed[p][r["sample_id"]] += 1
    out = []
    for p in sorted(set(pushed) | set(reviewed)):
        cells: dict[tuple, dict[str, int]] = defaultdict(lambda: {"pushed": 0, "reviewed": 0, "pending": 0,
                                                                  "reviews": 0})
        for sid in pushed.get(p, set()) | set(reviewed.get(p, {})):
            e = exprs.get(sid)
            s = stratum(e) if e is not None else ("?", 0, "?", "?")
            c = cells[s]
            in_push = sid in pushed.get(p, set())
            done = reviewed[p][sid] > 0
            c["pushed"] += in_push
            c["reviewed"] += done
            c["pending"] += in_push and not done
            c["reviews"] += reviewed[p][sid]
        for s in sorted(cells, key=lambda s: (s[0], s[1], s[2], s[3])):
            out.append({"project": p, "task": s[0], "difficulty": s[1], "polarity": s[2], "negative_type": s[3],
                        "stratum": stratum_label(s), **cells[s]})
    return out


# ------------------------------------------------------------------------------------------------ cycle

def _agreement(rows: list[dict[str, Any]], expressions: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreement per stratum and the disagreements (:func:`refforge.stages.review_stats.agreement`)."""
    return agreement(rows, expressions).as_dict()


@flow(name="refforge-review", log_prints=False)
def review_cycle(build: str, project: str, size: int = 100, strategy: str = "needs_review",
                 split: str | None = None, overlap: int | None = None, fraction: float | None = None, seed: int = 0,
                 url: str | None = None, files_root: str | None = None) -> dict[str, Any]:
    """One review cycle: push the next batch, pull every decision, recompute agreement.

    The token comes from ``REFFORGE_LS_TOKEN`` (never a flow parameter: parameters are stored by Prefect)."""
    pushed = push(build, project, size=size, strategy=strategy, split=split, overlap=overlap, fraction=fraction,
                  seed=seed, url=url, files_root=files_root)
    pulled = pull(build, project, url=url)
    b = _open(build)
    rows = [r for r in b.reader.read("reviews").to_pylist() if r.get("project") in (None, project)]
    return {"push": asdict(pushed) | {"task_ids": len(pushed.task_ids)}, "pull": asdict(pulled),
            "agreement": _agreement(rows, _expressions(b))}
