"""`refforge review push / pull / status` against the session's real Label Studio server."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from refforge.commands import review as review_cmd
from refforge.flows.export import export_build
from refforge.flows.review import pull, push, status
from refforge.review import labelstudio as ls
from refforge.review.server import ReviewError
from refforge.stages.export_records import read_canonical
from refforge.storage import Catalog, TableReader
from tests.conftest import small_config


@pytest.fixture(scope="module")
def build(label_studio, prefect_api) -> Path:
    """A small build under the server's files root, with one export recorded (its test split)."""
    from refforge.config import parse_config
    from refforge.flows.build import run_build

    out = label_studio.files_root / "builds" / "review"
    run_build(parse_config(small_config(images=16, shard_size=8)), out)
    export_build(out, label_studio.files_root.parent / "first-export", ["parquet"], seed=0)
    return out


def _rows(build: Path, table: str) -> list[dict]:
    return TableReader(build / "tables").read(table).to_pylist()


def _exprs(build: Path) -> dict[str, dict]:
    return {r["sample_id"]: r for r in _rows(build, "expressions")}


def _project_tasks(client, name: str) -> list[dict]:
    return client.tasks(client.find_project(name)["id"])


# ----------------------------------------------------------------------------------------------- push

def test_push_sends_a_batch_once_and_resumes_an_interrupted_push(build, label_studio, monkeypatch):
    client = label_studio.client()
    n = len(_exprs(build))
    assert n >= 60
    # the audit set is fixed: a push of it, then the same push again, sends nothing new
    frac = 30 / n
    r = push(build, "audit", size=None, strategy="audit", fraction=frac)
    assert (r.sent, r.selected, r.already_in_project) == (30, 30, 0)
    tasks = _project_tasks(client, "audit")
    assert len(tasks) == 30 and len({t["data"]["sample_id"] for t in tasks}) == 30
    pred = next(t for t in tasks if t["data"]["polarity"] == "positive")["predictions"][0]
    assert pred["model_version"].startswith("small-") and pred["result"][0]["value"]["rectanglelabels"] == ["target"]
    again = push(build, "audit", size=None, strategy="audit", fraction=frac)
    assert (again.sent, again.already_in_project) == (0, 30)
    assert len(_project_tasks(client, "audit")) == 30
    batches = [b for b in _rows(build, "review_batches") if b["project"] == "audit"]
    assert len(batches) == 30 and {b["strategy"] for b in batches} == {"audit"}
    assert {b["task_id"]: b["sample_id"] for b in batches} == {str(t["id"]): t["data"]["sample_id"] for t in tasks}
    assert all(label_studio.token not in json.dumps(b, default=str) for b in batches)

    # an import that fails after the first batch of 10: 10 tasks in, 10 rows, the re-run sends the other 20
    real = ls.Client.import_tasks
    calls = Counter()

    def failing(self, project_id, tasks, batch=500, on_batch=None):
        def once(ids, part):
            calls["batches"] += 1
            on_batch(ids, part)
            if calls["batches"] == 1:
                raise ls.ReviewServerError("simulated: the connection dropped after the first batch")
        return real(self, project_id, tasks, batch=batch, on_batch=once)

    monkeypatch.setattr(ls.Client, "import_tasks", failing)
    with pytest.raises(ReviewError, match="simulated"):
        push(build, "resume", size=30, strategy="needs_review", batch=10)
    monkeypatch.setattr(ls.Client, "import_tasks", real)
    assert len(_project_tasks(client, "resume")) == 10
    assert len([b for b in _rows(build, "review_batches") if b["project"] == "resume"]) == 10
    r = push(build, "resume", size=30, strategy="needs_review", batch=10)
    assert r.resumed and (r.sent, r.already_in_project) == (20, 10)
    tasks = _project_tasks(client, "resume")
    sids = [t["data"]["sample_id"] for t in tasks]
    assert len(sids) == 30 and len(set(sids)) == 30
    rows = [b for b in _rows(build, "review_batches") if b["project"] == "resume"]
    assert len(rows) == 30 and len({b["sample_id"] for b in rows}) == 30 and len({b["batch_id"] for b in rows}) == 1
    # needs_review first: every needs_review sample of the build is in the first batch of 30 (when they fit)
    exprs = _exprs(build)
    nr = {s for s, e in exprs.items() if e["needs_review"]}
    assert nr <= set(sids) or set(sids) <= nr
    # the same command once the push is complete: the next batch, never a sample twice
    nxt = push(build, "resume", size=30, strategy="needs_review", batch=10)
    assert not nxt.resumed and nxt.sent == 30
    sids = [t["data"]["sample_id"] for t in _project_tasks(client, "resume")]
    assert len(sids) == 60 and len(set(sids)) == 60


def test_push_refuses_a_down_server_a_wrong_token_and_a_build_outside_the_files_root(
        build, label_studio, tmp_path, prefect_api):
    before = len(list((build / "tables").rglob("*.parquet")))
    with pytest.raises(ReviewError, match=r"cannot reach Label Studio at http://127\.0\.0\.1:9"):
        push(build, "x", size=5, url="http://127.0.0.1:9")
    with pytest.raises(ReviewError, match="rejected the token"):
        push(build, "x", size=5, token="not-the-token")
    with pytest.raises(ReviewError, match="not under the files root"):
        push(build, "x", size=5, files_root=tmp_path)
    assert len(list((build / "tables").rglob("*.parquet"))) == before
    assert label_studio.client().find_project("x") is None


# ------------------------------------------------------------------------------------------ pull, status

def _annotate_and_pull(build, label_studio):
    """Push the test split first, two annotators annotate through the server's API; returns what was done."""
    client = label_studio.client()
    r = push(build, "e2e", size=30, strategy="test", overlap=2)
    assert r.sent == 30
    proj = client.find_project("e2e")
    assert proj["maximum_annotations"] == 2
    exprs = _exprs(build)
    images = {i["image_id"]: i for i in _rows(build, "images")}
    splits = {s["sample_id"]: s["split"] for s in _rows(build, "splits")}
    tasks = {t["data"]["sample_id"]: t for t in client.tasks(proj["id"])}
    test = sorted(s for s in tasks if splits.get(s) == "test")
    pos = [s for s in test if exprs[s]["polarity"] == "positive"]
    neg = [s for s in test if exprs[s]["polarity"] == "negative"]
    assert len(pos) >= 4 and neg, (len(pos), len(neg))
    p_acc, p_fix, p_text, p_rej = pos[:4]
    n_fix = neg[0]
    out_box = next(s for s in test if s not in {p_acc, p_fix, p_text, p_rej, n_fix})

    def size(sid):
        img = images[exprs[sid]["image_id"]]
        return int(img["width"]), int(img["height"])

    def tid(sid):
        return tasks[sid]["id"]

    x1, y1, x2, y2 = exprs[p_fix]["gt_box"]
    new_box = (x1 + 4.0, y1 + 3.0, x2 - 2.0, y2 - 1.0)
    drawn = (10.0, 20.0, 110.0, 90.0)
    u2 = label_studio.make_user("second@example.com")
    # admin: a reject replaced by a later accept (the latest annotation counts), a fix with a new box, a drawn
    # box on a negative, a text fix, a reject, a box outside the image
    client.annotate(tid(p_acc), [ls.decision_result("reject")], lead_time=3.0)
    client.annotate(tid(p_acc), [ls.decision_result("accept")], lead_time=4.5)
    client.annotate(tid(p_fix), [ls.decision_result("fix"), ls.box_result(new_box, *size(p_fix))])
    client.annotate(tid(n_fix), [ls.decision_result("fix"), ls.box_result(drawn, *size(n_fix))])
    client.annotate(tid(p_text), [ls.decision_result("fix"), ls.text_result("the corrected ball")])
    client.annotate(tid(p_rej), [ls.decision_result("reject")])
    w, h = size(out_box)
    client.annotate(tid(out_box), [ls.decision_result("fix"), ls.box_result((w - 20, 5, w + 40, 50), w, h)])
    # the second annotator: agrees on two, skips one (cancelled: ignored)
    client.annotate(tid(p_acc), [ls.decision_result("accept")], token=u2)
    client.annotate(tid(p_rej), [ls.decision_result("reject")], token=u2)
    client.annotate(tid(p_fix), [], token=u2, was_cancelled=True)
    # a task the build does not know
    stranger = client.import_tasks(proj["id"], [{"data": {"image": "/data/local-files/?d=x.png", "expression": "?",
                                                          "sample_id": "not-in-this-build", "question": "?"}}])
    client.annotate(stranger[0], [ls.decision_result("accept")])
    return {"p_acc": p_acc, "p_fix": p_fix, "p_text": p_text, "p_rej": p_rej, "n_fix": n_fix, "out": out_box,
            "new_box": new_box, "drawn": drawn, "u2": u2, "tid": tid}


@pytest.fixture(scope="module")
def pulled(build, label_studio):
    done = _annotate_and_pull(build, label_studio)
    done["first"] = pull(build, "e2e")
    return done


def test_pull_turns_annotations_into_reviews_rows(build, label_studio, pulled):
    s, res = pulled, pulled["first"]
    assert res.rows_written == 7 and res.cancelled == 1
    assert res.drop_reasons == {"box_outside_image": 1, "unknown_task": 1}
    rows = [r for r in _rows(build, "reviews") if r["project"] == "e2e"]
    by = {(r["sample_id"], r["annotator"]): r for r in rows}
    admin, second = "admin@example.com", "second@example.com"
    assert len(rows) == 7 and len(by) == 7
    assert by[(s["p_acc"], admin)]["decision"] == "accept" and by[(s["p_acc"], admin)]["lead_time_s"] == 4.5
    assert by[(s["p_acc"], second)]["decision"] == "accept"
    assert by[(s["p_rej"], admin)]["decision"] == by[(s["p_rej"], second)]["decision"] == "reject"
    fix = by[(s["p_fix"], admin)]
    assert fix["decision"] == "fix" and fix["fixed_box"] == pytest.approx(s["new_box"], abs=1e-6)
    neg = by[(s["n_fix"], admin)]
    assert neg["decision"] == "fix" and neg["fixed_box"] == pytest.approx(s["drawn"], abs=1e-6)
    txt = by[(s["p_text"], admin)]
    assert txt["decision"] == "fix" and txt["fixed_box"] is None and txt["fixed_text"] == "the corrected ball"
    for r in rows:
        assert r["task_id"] == str(s["tid"](r["sample_id"]))
        assert r["created"] <= r["updated"] == r["time"]
    assert (s["out"], admin) not in by
    drops = [d for d in _rows(build, "drops") if d["stage"] == "review"]
    assert {d["reason"] for d in drops} == {"box_outside_image", "unknown_task"}
    assert any("not-in-this-build" in d["detail"] for d in drops)
    # pulling twice writes nothing new
    shards = sorted((build / "tables").rglob("*.parquet"))
    again = pull(build, "e2e")
    assert (again.rows_written, again.drops_written, again.rows_known) == (0, 0, 7)
    assert sorted((build / "tables").rglob("*.parquet")) == shards


def test_status_counts_per_project_and_stratum(build, pulled):
    rows = [r for r in status(build) if r["project"] == "e2e"]
    assert sum(r["pushed"] for r in rows) == 30
    assert sum(r["reviewed"] for r in rows) == 5  # the box outside the image was dropped
    assert sum(r["pending"] for r in rows) == 25
    assert sum(r["reviews"] for r in rows) == 7
    assert all(r["pushed"] == r["reviewed"] + r["pending"] for r in rows)
    assert {"task", "difficulty", "polarity", "negative_type"} <= set(rows[0])
    audit = [r for r in status(build) if r["project"] == "audit"]
    assert sum(r["pushed"] for r in audit) == 30 and sum(r["reviewed"] for r in audit) == 0


def test_an_updated_annotation_is_pulled_once_more(build, label_studio, pulled):
    client = label_studio.client()
    task = next(t for t in client.tasks(client.find_project("e2e")["id"]) if t["data"]["sample_id"] == pulled["p_rej"])
    ann = next(a for a in task["annotations"] if a["completed_by_email"] == "second@example.com")
    client.update_annotation(ann["id"], [ls.decision_result("accept")], token=pulled["u2"])
    r = pull(build, "e2e")
    assert r.rows_written == 1 and r.rows_known == 6  # the other six annotations were pulled before
    mine = sorted((r for r in _rows(build, "reviews") if r["sample_id"] == pulled["p_rej"]
                   and r["annotator"] == "second@example.com"), key=lambda r: r["time"])
    assert [r["decision"] for r in mine] == ["reject", "accept"]
    # back to reject (the export test below expects the sample rejected)
    client.update_annotation(ann["id"], [ls.decision_result("reject")], token=pulled["u2"])
    assert pull(build, "e2e").rows_written == 1


def test_export_with_reviewed_test_applies_the_pulled_reviews(build, pulled, tmp_path):
    s = pulled
    assignment = {r["sample_id"]: r["split"] for r in _rows(build, "splits")}
    meta = export_build(build, tmp_path / "ex", ["parquet"], reviewed_test=True, assignment=assignment,
                        record_splits=False)
    got = {r["sample_id"]: r for r in read_canonical(tmp_path / "ex")}
    test = {sid for sid, r in got.items() if r["split"] == "test"}
    assert test == {s["p_acc"], s["p_fix"], s["p_text"], s["n_fix"]}
    assert s["p_rej"] not in got
    assert got[s["p_fix"]]["bbox"] == pytest.approx(list(s["new_box"]), abs=1e-6)
    assert got[s["p_text"]]["expression"] == "the corrected ball"
    # a negative whose referent a reviewer drew becomes a positive with the reviewed box
    neg = got[s["n_fix"]]
    assert neg["polarity"] == "positive" and neg["bbox"] == pytest.approx(list(s["drawn"]), abs=1e-6)
    assert meta["dropped"]["rejected by a reviewer"] == 1


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_status_pull_and_one_line_errors(build, label_studio, pulled, monkeypatch):
    app = typer.Typer()
    review_cmd.register(app)
    runner = CliRunner()
    r = runner.invoke(app, ["review", "status", str(build)])
    assert r.exit_code == 0, r.output
    assert "e2e: 30 pushed, 5 reviewed, 25 pending" in r.output
    r = runner.invoke(app, ["review", "pull", str(build), "--project", "e2e"])
    assert r.exit_code == 0 and "0 new reviews rows" in r.output, r.output
    monkeypatch.setenv("REFFORGE_LS_TOKEN", "wrong-token")
    r = runner.invoke(app, ["review", "push", str(build), "--project", "e2e", "--size", "3"])
    assert r.exit_code == 2 and "rejected the token" in r.output and "wrong-token" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["review", "push", str(build), "--project", "e2e", "--strategy", "random"])
    assert r.exit_code == 2 and "unknown --strategy" in r.output
    with Catalog(build) as cat:  # nothing was pushed by the failed commands
        assert cat.sql("SELECT count(*) AS n FROM review_batches WHERE project = 'e2e'").to_pylist()[0]["n"] == 30


def test_review_cycle_flow_pushes_the_next_batch_pulls_and_measures_agreement(build, label_studio, pulled):
    from refforge.flows.review import review_cycle

    out = review_cycle(build=str(build), project="e2e", size=4, strategy="stratified")
    assert out["push"]["sent"] == 4 and out["pull"]["rows_written"] == 0
    ag = out["agreement"]
    assert ag["n_samples"] == 5 and ag["multi"] == 2
    assert ag["disagreements"] == []  # both annotators agree on the two samples they share
    assert json.dumps(out, default=str)  # a flow result Prefect can store
    assert sum(r["pushed"] for r in status(build) if r["project"] == "e2e") == 34
    # no --overlap: the project's own setting stays (2, from the first push)
    assert label_studio.client().find_project("e2e")["maximum_annotations"] == 2
    assert {b["overlap"] for b in _rows(build, "review_batches") if b["project"] == "e2e"} == {2}
