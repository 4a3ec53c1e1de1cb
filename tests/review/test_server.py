"""The Label Studio server refforge starts, and the client refforge talks to it with (a real server)."""

from __future__ import annotations

import json
import secrets
import socket
import uuid

import httpx
import pytest

from refforge._daemon import group_alive as _group_alive
from refforge.review import labelstudio as L
from refforge.review.server import (
    STATE_NAME,
    ReviewServerError,
    health,
    server_status,
    start_server,
    stop_server,
)
from refforge.stages.scene.boxes import from_percent, to_percent

IMG = {"width": 640, "height": 480}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(e: BaseException, *secrets_: str) -> str:
    msg = str(e)
    assert "\n" not in msg and msg
    for s in secrets_:
        assert s not in msg
    return msg


def _sample(i: int, polarity: str = "positive") -> dict:
    return {"sample_id": f"s{i:05d}", "text": f"the red square number {i}", "polarity": polarity,
            "gt_box": (64.0, 48.0, 320.0, 240.0) if polarity == "positive" else None, "difficulty": 1,
            "task": "attribute"}


@pytest.fixture(scope="module")
def build_folder(label_studio):
    """A folder under the server's files root with one image, like a build's image store."""
    from PIL import Image

    folder = label_studio.files_root / "builds" / "b1"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (640, 480), (200, 20, 20)).save(folder / "images" / "a.png")
    return folder


# -- boxes ------------------------------------------------------------------------------------------

def test_percent_conversions_are_inverse():
    box = (64.0, 48.0, 320.0, 240.0)
    assert to_percent(box, 640, 480) == (10.0, 10.0, 40.0, 40.0)
    assert from_percent((10.0, 10.0, 40.0, 40.0), 640, 480) == box
    rng = __import__("random").Random(0)
    for _ in range(200):
        w, h = rng.randint(10, 4000), rng.randint(10, 4000)
        x1, y1 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
        b = (x1, y1, rng.uniform(x1 + 1, w), rng.uniform(y1 + 1, h))
        back = from_percent(to_percent(b, w, h), w, h)
        assert max(abs(a - c) for a, c in zip(b, back, strict=True)) < 1e-9


def test_task_payload_and_read_annotation():
    pos = L.task_payload(_sample(1), IMG, "/data/local-files/?d=builds/b1/images/a.png", "build-abc")
    assert pos["data"]["question"] == L.POSITIVE_QUESTION and pos["data"]["sample_id"] == "s00001"
    (pred,) = pos["predictions"]
    assert pred["model_version"] == "build-abc"
    (r,) = pred["result"]
    assert r["value"] == {"x": 10.0, "y": 10.0, "width": 40.0, "height": 40.0, "rotation": 0,
                          "rectanglelabels": ["target"]}
    assert (r["original_width"], r["original_height"], r["from_name"], r["to_name"], r["type"]) == \
        (640, 480, "box", "image", "rectanglelabels")
    neg = L.task_payload(_sample(2, "negative"), IMG, "/x", "build-abc")
    assert neg["data"]["question"] == "Does anything in the image match this?"
    assert neg["predictions"][0]["result"] == []

    ann = {"result": [L.decision_result("fix"), L.box_result((60, 40, 300, 250), 640, 480),
                      L.text_result(" the red box ")]}
    decision, box, text = L.read_annotation(ann, 640, 480)
    assert decision == "fix" and text == "the red box"
    assert box == pytest.approx((60, 40, 300, 250))
    assert L.read_annotation({"result": [L.decision_result("reject")]}, 640, 480) == ("reject", None, None)
    assert L.read_annotation({"result": [L.box_result((1, 2, 3, 4), 640, 480)]}, 640, 480)[0] == "fix"
    assert L.read_annotation({"result": []}, 640, 480) == (None, None, None)
    with pytest.raises(ValueError):
        L.decision_result("maybe")


def test_label_config_names():
    cfg = L.LABEL_CONFIG
    for piece in ('<Choice value="accept"/>', '<Choice value="reject"/>', '<Choice value="fix"/>',
                  '<RectangleLabels name="box" toName="image"', '<Label value="target"', "<TextArea",
                  'value="$expression"', 'value="$question"', 'value="$image"'):
        assert piece in cfg


# -- the server's life cycle -------------------------------------------------------------------------

def test_start_refuses_without_credentials(tmp_path, monkeypatch):
    for k in ("REFFORGE_LS_USERNAME", "REFFORGE_LS_PASSWORD", "REFFORGE_LS_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ReviewServerError) as e:
        start_server(tmp_path / "ls", port=_free_port(), files_root=tmp_path)
    msg = _one_line(e.value)
    assert "REFFORGE_LS_USERNAME" in msg and "REFFORGE_LS_TOKEN" in msg
    assert not (tmp_path / "ls" / STATE_NAME).exists()


def test_stop_and_status_without_a_server(tmp_path):
    assert server_status(tmp_path) is None
    assert stop_server(tmp_path) is None
    # a state file left by a server that is gone (a dead pid) reads as down and is cleaned up
    (tmp_path / STATE_NAME).write_text(json.dumps({"pid": 2**22 + 12345, "host": "127.0.0.1", "port": 1,
                                                   "url": "http://127.0.0.1:1", "files_root": "/",
                                                   "data_dir": str(tmp_path), "log": "x", "started_at": 0}))
    assert server_status(tmp_path) is None
    assert not (tmp_path / STATE_NAME).exists()


def test_session_server_status_and_second_start(label_studio):
    info = server_status(label_studio.data_dir)
    assert info is not None and info.up and info.url == label_studio.url
    assert info.files_root == str(label_studio.files_root.resolve())
    assert health(label_studio.url)
    state = (label_studio.data_dir / STATE_NAME).read_text()
    assert label_studio.token not in state and json.loads(state)["pid"] == info.pid
    log = (label_studio.data_dir / "label-studio.log").read_text(errors="replace")
    assert label_studio.token not in log
    again = start_server(label_studio.data_dir, port=_free_port())
    assert again.already_running and again.pid == info.pid and again.url == label_studio.url


def test_start_status_stop_round_trip(tmp_path, label_studio):
    """A second, own server: start, status, stop (the process group ends, the state file goes)."""
    data_dir, port = tmp_path / "ls", _free_port()
    with pytest.raises(ReviewServerError) as e:  # the session server's port is taken
        start_server(data_dir, port=int(label_studio.url.rsplit(":", 1)[1]), files_root=tmp_path)
    assert "in use" in _one_line(e.value, label_studio.token)
    info = start_server(data_dir, port=port, files_root=tmp_path)
    try:
        assert info.up and not info.already_running and info.url == f"http://127.0.0.1:{port}"
        assert health(info.url) and server_status(data_dir).pid == info.pid
        with L.connect(info.url, label_studio.token) as c:  # the token from the environment is the admin's
            assert c.check()["email"] == "admin@example.com"
    finally:
        stopped = stop_server(data_dir)
    assert stopped is not None and stopped.pid == info.pid
    assert server_status(data_dir) is None and not health(info.url)
    assert not _group_alive(info.pid)  # the whole process group ended


# -- the client ------------------------------------------------------------------------------------

def test_wrong_token_is_one_line_without_the_token(label_studio):
    bad = "wrong-" + secrets.token_hex(8)
    with pytest.raises(ReviewServerError) as e, L.connect(label_studio.url, bad) as c:
        c.check()
    msg = _one_line(e.value, bad, label_studio.token)
    assert label_studio.url in msg and "rejected the token in REFFORGE_LS_TOKEN" in msg


def test_server_down_is_one_line(label_studio):
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ReviewServerError) as e, L.connect(url, label_studio.token) as c:
        c.project("refforge-down")
    msg = _one_line(e.value, label_studio.token)
    assert msg.startswith(f"cannot reach Label Studio at {url}") and "refforge review server start" in msg


def test_connect_from_environment(label_studio, monkeypatch):
    with L.connect() as c:
        assert c.url == label_studio.url and c.check()["email"] == "admin@example.com"
        assert c.files_root == label_studio.files_root.resolve()
    monkeypatch.delenv("REFFORGE_LS_TOKEN")
    with pytest.raises(ReviewServerError) as e:
        L.connect()
    assert "REFFORGE_LS_TOKEN" in _one_line(e.value)


def test_project_is_reused_and_an_edited_config_refused(label_studio):
    name = f"refforge-{uuid.uuid4().hex[:8]}"
    with label_studio.client() as c:
        p = c.project(name)
        assert p["title"] == name and p["label_config"] == L.LABEL_CONFIG
        assert c.project(name)["id"] == p["id"]
        # only whitespace differs: migrated to refforge's config
        c.sdk.projects.update(id=p["id"], label_config=L.LABEL_CONFIG.replace("\n  ", "\n      ") + "\n")
        assert c.project(name)["label_config"] == L.LABEL_CONFIG
        # edited by hand: refused
        edited = L.LABEL_CONFIG.replace('<Choice value="fix"/>', '<Choice value="fix"/>\n    <Choice value="skip"/>')
        c.sdk.projects.update(id=p["id"], label_config=edited)
        with pytest.raises(L.ReviewConfigError) as e:
            c.project(name)
        msg = _one_line(e.value, label_studio.token)
        assert name in msg and "edited by hand" in msg
        with pytest.raises(ReviewServerError):
            c.project(f"refforge-missing-{uuid.uuid4().hex[:6]}", create=False)


def test_storage_must_be_a_subfolder_of_the_files_root(label_studio, build_folder, tmp_path):
    with label_studio.client() as c:
        pid = c.project(f"refforge-{uuid.uuid4().hex[:8]}")["id"]
        for outside in (tmp_path, label_studio.files_root):  # refused by refforge (root known)
            with pytest.raises(ReviewServerError) as e:
                c.connect_storage(pid, outside)
            assert "not a subfolder" in _one_line(e.value, label_studio.token)
        c.files_root = None  # root unknown: the server refuses with its own message
        with pytest.raises(ReviewServerError) as e:
            c.connect_storage(pid, tmp_path)
        assert "LOCAL_FILES_DOCUMENT_ROOT" in _one_line(e.value, label_studio.token)
        s1 = c.connect_storage(pid, build_folder, files_root=label_studio.files_root)
        s2 = c.connect_storage(pid, build_folder)
        assert s1["id"] == s2["id"] and s1["path"] == str(build_folder.resolve())


def test_import_1200_tasks_in_batches(label_studio, build_folder):
    url = L.image_url(build_folder / "images" / "a.png", label_studio.files_root)
    tasks = [L.task_payload(_sample(i, "negative" if i % 7 == 0 else "positive"), IMG, url, "build-x")
             for i in range(1200)]
    batches = []
    with label_studio.client() as c:
        pid = c.project(f"refforge-{uuid.uuid4().hex[:8]}")["id"]
        ids = c.import_tasks(pid, tasks, batch=500, on_batch=lambda got, part: batches.append((len(got), len(part))))
        assert len(ids) == 1200 == len(set(ids))
        assert batches == [(500, 500), (500, 500), (200, 200)]
        back = c.tasks(pid, page_size=500)
        assert len(back) == 1200
        by_id = {t["id"]: t for t in back}
        assert [by_id[i]["data"]["sample_id"] for i in ids] == [f"s{i:05d}" for i in range(1200)]
        assert all(len(by_id[i]["predictions"]) == 1 for i in ids)
        # a rejected batch: the server's message, one line; the batch before it stays imported
        bad = tasks[:2] + [{"data": "not a dict"}]
        with pytest.raises(ReviewServerError) as e:
            c.import_tasks(pid, bad, batch=2)
        msg = _one_line(e.value, label_studio.token)
        assert "tasks 3-3 of 3" in msg and "must be dict" in msg
        assert len(c.tasks(pid)) == 1202


def test_two_annotators_read_back(label_studio, build_folder):
    url = L.image_url(build_folder / "images" / "a.png", label_studio.files_root)
    second = f"annotator-{uuid.uuid4().hex[:6]}@example.com"
    token2 = label_studio.make_user(second)
    assert token2 != label_studio.token and label_studio.users[second]
    with label_studio.client() as c:
        pid = c.project(f"refforge-{uuid.uuid4().hex[:8]}")["id"]
        c.connect_storage(pid, build_folder)
        # the image is served from the local-files storage
        r = httpx.get(label_studio.url + url, headers={"Authorization": f"Token {label_studio.token}"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        tid, tid_neg = c.import_tasks(pid, [L.task_payload(_sample(1), IMG, url, "build-x"),
                                            L.task_payload(_sample(2, "negative"), IMG, url, "build-x")])
        a1 = c.annotate(tid, [L.decision_result("accept")], lead_time=3.5)
        c.annotate(tid, [L.decision_result("fix"), L.box_result((60, 40, 300, 250), 640, 480),
                         L.text_result("the red box")], token=token2, lead_time=7.0)
        c.annotate(tid_neg, [L.decision_result("fix"), L.box_result((10, 10, 50, 60), 640, 480)], token=token2)
        c.update_annotation(a1["id"], [L.decision_result("reject")])
        emails = {u["id"]: u["email"] for u in c.users()}
        assert emails[label_studio.users[second]] == second
        tasks = {t["id"]: t for t in c.tasks(pid)}
    anns = {a["completed_by_email"]: a for a in tasks[tid]["annotations"]}
    assert set(anns) == {"admin@example.com", second}
    mine, theirs = anns["admin@example.com"], anns[second]
    assert theirs["completed_by"] == label_studio.users[second]
    assert L.read_annotation(mine, 640, 480) == ("reject", None, None)
    assert mine["lead_time"] == pytest.approx(3.5) and mine["updated_at"] >= mine["created_at"]
    decision, box, text = L.read_annotation(theirs, 640, 480)
    assert decision == "fix" and text == "the red box" and box == pytest.approx((60, 40, 300, 250))
    for key in ("id", "created_at", "updated_at", "was_cancelled", "result"):
        assert key in theirs
    (neg,) = tasks[tid_neg]["annotations"]
    assert L.read_annotation(neg, 640, 480)[1] == pytest.approx((10, 10, 50, 60))
    assert tasks[tid]["predictions"][0]["model_version"] == "build-x"
