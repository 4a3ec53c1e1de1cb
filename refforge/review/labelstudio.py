"""A thin client of a Label Studio server (label-studio-sdk 2.x, plus plain HTTP where the SDK is awkward).

Through the SDK (``label_studio_sdk.LabelStudio``): projects (create, list by title, get, update), the
local-files import storage (list, create) and task import (``projects.import_tasks`` with
``return_task_ids``). Plain HTTP on the same connection and the same auth headers as the SDK:
``GET /api/current-user/whoami`` (the connection check), ``GET /api/tasks`` (paged task lists with
annotations and predictions as plain dicts: fast for 10,000 tasks), ``GET /api/users/``, and the
web sign-up form plus ``GET /api/current-user/token`` (what a second annotator needs; the API has no
call that returns another user's token). Annotating as a given user goes through the SDK with that
user's token (``annotations.create`` / ``annotations.update``).

Errors are one line (:class:`ReviewServerError`, :class:`ReviewConfigError`, both ``ValueError``),
name the URL and what to check, and never hold a token.

Boxes: Label Studio speaks percent ``(x, y, width, height)`` of the image with
``original_width/height``; refforge speaks ``(x1, y1, x2, y2)`` pixels. The conversions are
:func:`refforge.stages.scene.boxes.to_percent` and :func:`~refforge.stages.scene.boxes.from_percent`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from refforge.optional import require
from refforge.review.server import ReviewError, ReviewServerError
from refforge.stages.scene.boxes import from_percent, to_percent

__all__ = [
    "DEFAULT_URL",
    "LABEL_CONFIG",
    "NEGATIVE_QUESTION",
    "POSITIVE_QUESTION",
    "Client",
    "ReviewConfigError",
    "ReviewServerError",
    "connect",
    "image_url",
    "read_annotation",
    "task_payload",
]

DEFAULT_URL = "http://127.0.0.1:8080"
IMPORT_BATCH = 500  # tasks a request: safely under the server's per-request import limit
PAGE_SIZE = 1000

# names in the labelling config: the pull side reads annotations by these
FROM_DECISION = "decision"
FROM_BOX = "box"
FROM_TEXT = "fixed_text"
TO_IMAGE = "image"
BOX_LABEL = "target"
DECISIONS = ("accept", "reject", "fix")

POSITIVE_QUESTION = "Is the box exactly the object this describes?"
NEGATIVE_QUESTION = "Does anything in the image match this?"

LABEL_CONFIG = """<View>
  <Header value="$expression" size="3"/>
  <Header value="$question" size="5"/>
  <Text name="help" value="accept: right as shown (a negative: nothing matches) | reject: unusable | fix: correct the box, draw the object that matches, or correct the text"/>
  <Choices name="decision" toName="image" choice="single" showInline="true" required="true">
    <Choice value="accept"/>
    <Choice value="reject"/>
    <Choice value="fix"/>
  </Choices>
  <Image name="image" value="$image" zoom="true" zoomControl="true"/>
  <RectangleLabels name="box" toName="image" strokeWidth="3">
    <Label value="target" background="#ff2d55"/>
  </RectangleLabels>
  <TextArea name="fixed_text" toName="image" placeholder="the corrected expression (only when the text is wrong)" maxSubmissions="1" editable="true" rows="2"/>
</View>"""


class ReviewConfigError(ReviewError):
    """A project's labelling config is not the one refforge writes (edited by hand)."""


def _squash(xml: str) -> str:
    """The config with the whitespace between and inside tags normalised (what counts as 'the same')."""
    return re.sub(r"\s+", " ", re.sub(r">\s+<", "><", xml.strip()))


def image_url(path: str | os.PathLike, files_root: str | os.PathLike) -> str:
    """The URL Label Studio serves ``path`` at from a local-files storage under ``files_root``.

    >>> image_url("/data/root/builds/demo/images/ab.png", "/data/root")
    '/data/local-files/?d=builds/demo/images/ab.png'
    """
    p, root = Path(path).resolve(), Path(files_root).resolve()
    try:
        rel = p.relative_to(root)
    except ValueError:
        raise ReviewServerError(f"{p} is not under the server's files root {root}") from None
    return f"/data/local-files/?d={rel.as_posix()}"


def _clean(message: Any, limit: int = 300) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def connect(url: str | None = None, token: str | None = None, files_root: str | os.PathLike | None = None,
            timeout: float = 120.0) -> Client:
    """A :class:`Client` of ``url`` (else ``REFFORGE_LS_URL``, else http://127.0.0.1:8080) with
    ``token`` (else ``REFFORGE_LS_TOKEN``); nothing is sent until a call (see :meth:`Client.check`).

    ``files_root`` (else ``REFFORGE_LS_FILES_ROOT``, else unknown): the server's local-files document
    root, which image URLs and storage folders are relative to."""
    url = (url or os.environ.get("REFFORGE_LS_URL") or DEFAULT_URL).rstrip("/")
    token = token or os.environ.get("REFFORGE_LS_TOKEN")
    if not token:
        raise ReviewServerError(f"set REFFORGE_LS_TOKEN to the API token of {url} (its admin user's token)")
    files_root = files_root or os.environ.get("REFFORGE_LS_FILES_ROOT") or None
    return Client(url, token, files_root=files_root, timeout=timeout)


class Client:
    """One Label Studio server, as one user (the token's)."""

    def __init__(self, url: str, token: str, files_root: str | os.PathLike | None = None, timeout: float = 120.0):
        require("label_studio_sdk", "review", feature="refforge review")
        import httpx
        from label_studio_sdk import LabelStudio

        self.url = url.rstrip("/")
        self.files_root = Path(files_root).expanduser().resolve() if files_root is not None else None
        self._timeout = timeout
        self._http = httpx.Client(timeout=timeout, follow_redirects=True)
        try:
            self.sdk = LabelStudio(base_url=self.url, api_key=token, timeout=timeout, httpx_client=self._http)
        except Exception as e:  # the SDK checks a JWT's expiry up front
            raise ReviewServerError(f"{self.url} cannot use the token in REFFORGE_LS_TOKEN: "
                                    f"{_clean(getattr(e, 'body', e))}") from None

    def __repr__(self) -> str:  # never the token
        return f"Client({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- errors and raw HTTP ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate transport and API errors into one-line :class:`ReviewServerError`s."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            yield
        except httpx.TransportError:
            raise ReviewServerError(f"cannot reach Label Studio at {self.url}; is `refforge review server start` "
                                    "running (and REFFORGE_LS_URL right)?") from None
        except ApiError as e:
            raise self._api_error(what, e.status_code, e.body) from None

    def _api_error(self, what: str, status: int | None, body: Any) -> ReviewServerError:
        if status == 401:
            return ReviewServerError(f"Label Studio at {self.url} rejected the token in REFFORGE_LS_TOKEN; check it "
                                     "(Account & Settings > Access token, or the one the server was started with)")
        if status == 403:
            return ReviewServerError(f"Label Studio at {self.url} does not allow the token's user to {what}")
        detail = (body.get("validation_errors") or body.get("detail") or body) if isinstance(body, dict) else body
        return ReviewServerError(f"Label Studio at {self.url} refused to {what} (HTTP {status}): {_clean(detail)}")

    def _request(self, method: str, path: str, what: str, *, token: str | None = None, **kw) -> Any:
        headers = ({"Authorization": f"Token {token}"} if token is not None
                   else self.sdk._client_wrapper.get_headers())  # the SDK's auth (legacy token or JWT)
        with self._errors(what):
            r = self._http.request(method, self.url + path, headers=headers, **kw)
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            raise self._api_error(what, r.status_code, body)
        return r.json() if r.content else None

    # -- connection ---------------------------------------------------------------------------------

    def check(self) -> dict:
        """The token's user (``whoami``); a one-line :class:`ReviewServerError` when the server is down or
        the token is wrong."""
        return self._request("GET", "/api/current-user/whoami", "say who the token belongs to")

    # -- projects -----------------------------------------------------------------------------------

    def find_project(self, name: str) -> dict | None:
        with self._errors("list projects"):
            for p in self.sdk.projects.list(title=name, page_size=100):
                if p.title == name:
                    return self._project_dict(p.id)
        return None

    def _project_dict(self, project_id: int) -> dict:
        return self._request("GET", f"/api/projects/{project_id}", "read the project")

    def project(self, name: str, create: bool = True) -> dict:
        """The project titled ``name`` (created with :data:`LABEL_CONFIG` when missing and ``create``).

        An existing project whose labelling config differs from :data:`LABEL_CONFIG` only in whitespace is
        migrated to it; any other difference raises :class:`ReviewConfigError`.
        """
        found = self.find_project(name)
        if found is None:
            if not create:
                raise ReviewServerError(f"Label Studio at {self.url} has no project {name!r}")
            with self._errors(f"create the project {name!r}"):
                p = self.sdk.projects.create(title=name, label_config=LABEL_CONFIG,
                                             description="refforge review (pushed by `refforge review push`)")
            return self._project_dict(p.id)
        config = found.get("label_config") or ""
        if config != LABEL_CONFIG:
            if _squash(config) != _squash(LABEL_CONFIG):
                raise ReviewConfigError(
                    f"the labelling config of project {name!r} (id {found['id']}) on {self.url} is not refforge's "
                    "(edited by hand?); restore it, or push to a new --project")
            with self._errors(f"update the labelling config of {name!r}"):
                self.sdk.projects.update(id=found["id"], label_config=LABEL_CONFIG)
            found = self._project_dict(found["id"])
        return found

    # -- storage ------------------------------------------------------------------------------------

    def connect_storage(self, project_id: int, folder: str | os.PathLike,
                        files_root: str | os.PathLike | None = None) -> dict:
        """The project's local-files import storage of ``folder`` (created once, then reused).

        ``folder`` must be a subfolder of the server's files root (``files_root``, else the client's
        :attr:`files_root`); the server checks it too, and refuses with its own message.
        """
        folder = Path(folder).expanduser().resolve()
        root = Path(files_root).resolve() if files_root is not None else self.files_root
        if root is not None and (folder == root or root not in folder.parents):
            raise ReviewServerError(f"{folder} is not a subfolder of the server's files root {root}; start the "
                                    "server with a --files-root above it (the root itself cannot be a storage)")
        if not folder.is_dir():
            raise ReviewServerError(f"{folder} is not a folder")
        with self._errors("list the project's storages"):
            for s in self.sdk.import_storage.local.list(project=project_id):
                if s.path and Path(s.path).resolve() == folder:
                    return s.dict() if hasattr(s, "dict") else dict(s)
        with self._errors(f"connect the local-files storage {folder}"):
            s = self.sdk.import_storage.local.create(project=project_id, path=str(folder), use_blob_urls=True,
                                                     title=f"refforge {folder.name}", regex_filter=r"^$")
        return s.dict() if hasattr(s, "dict") else dict(s)

    # -- tasks --------------------------------------------------------------------------------------

    def import_tasks(self, project_id: int, tasks: Sequence[dict], batch: int = IMPORT_BATCH,
                     on_batch: Callable[[list[int], Sequence[dict]], None] | None = None) -> list[int]:
        """Import ``tasks`` in batches of ``batch``; returns the new task ids in the order of ``tasks``.

        ``on_batch(ids, tasks_of_the_batch)`` runs after the server accepted each batch (where a push
        records what went where). A rejected batch raises :class:`ReviewServerError` with the server's
        message; the batches before it stay imported (and were passed to ``on_batch``).
        """
        ids: list[int] = []
        for start in range(0, len(tasks), batch):
            part = list(tasks[start:start + batch])
            what = f"import tasks {start + 1}-{start + len(part)} of {len(tasks)}"
            with self._errors(what):
                r = self.sdk.projects.import_tasks(id=project_id, request=part, return_task_ids=True)
            got = [int(i) for i in (getattr(r, "task_ids", None) or [])]
            if len(got) != len(part):
                raise ReviewServerError(f"Label Studio at {self.url} answered {len(got)} task ids for {len(part)} "
                                        f"tasks ({what})")
            ids.extend(got)
            if on_batch is not None:
                on_batch(got, part)
        return ids

    def tasks(self, project_id: int, page_size: int = PAGE_SIZE) -> list[dict]:
        """All tasks of the project with their annotations and predictions (plain dicts, every page).

        Each annotation carries ``completed_by`` (the user id) and ``completed_by_email``.
        """
        out: list[dict] = []
        page = 1
        emails = None
        while True:
            r = self._request("GET", "/api/tasks", "list the project's tasks",
                              params={"project": project_id, "fields": "all", "page": page, "page_size": page_size})
            rows = r.get("tasks", []) if isinstance(r, dict) else r
            for t in rows:
                for a in t.get("annotations") or []:
                    who = a.get("completed_by")
                    if isinstance(who, dict):
                        a["completed_by_email"] = who.get("email")
                        a["completed_by"] = who.get("id")
                    elif who is not None:
                        if emails is None:
                            emails = {u["id"]: u.get("email") for u in self.users()}
                        a["completed_by_email"] = emails.get(who)
            out.extend(rows)
            total = r.get("total") if isinstance(r, dict) else None
            if not rows or len(rows) < page_size or (total is not None and len(out) >= total):
                return out
            page += 1

    # -- users and annotations (what tests and a second annotator need) ----------------------------

    def users(self) -> list[dict]:
        """The users of the token's organisation: id, email, username, ..."""
        r = self._request("GET", "/api/users/", "list users")
        return r.get("results", r) if isinstance(r, dict) else r

    def create_user(self, email: str, password: str | None = None) -> dict:
        """Sign ``email`` up through the server's sign-up form (it joins the organisation) and return
        ``{"id", "email", "token"}`` with that user's API token."""
        import httpx

        password = password or secrets.token_urlsafe(16)
        with self._errors(f"sign up {email}"), httpx.Client(base_url=self.url, timeout=self._timeout) as web:
            web.get("/user/signup/")
            csrf = web.cookies.get("csrftoken", "")
            r = web.post("/user/signup/", data={"email": email, "password": password, "csrfmiddlewaretoken": csrf},
                         headers={"Referer": self.url + "/user/signup/", "X-CSRFToken": csrf})
            if r.status_code != 302:
                raise ReviewServerError(f"Label Studio at {self.url} refused to sign up {email} (HTTP {r.status_code}; "
                                        "an existing user, or a password it finds too weak?)")
            token = web.get("/api/current-user/token").json()["token"]
            me = web.get("/api/current-user/whoami").json()
        return {"id": me["id"], "email": me["email"], "token": token}

    def _as(self, token: str):
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=token, timeout=self._timeout, httpx_client=self._http)

    def annotate(self, task_id: int, result: list[dict], token: str | None = None,
                 lead_time: float | None = None, was_cancelled: bool = False) -> dict:
        """Submit an annotation of ``task_id`` as the user of ``token`` (default: this client's user)."""
        client = self.sdk if token is None else self._as(token)
        kw = {"lead_time": lead_time} if lead_time is not None else {}
        with self._errors(f"annotate task {task_id}"):
            a = client.annotations.create(id=task_id, result=result, was_cancelled=was_cancelled, **kw)
        return a.dict() if hasattr(a, "dict") else dict(a)

    def update_annotation(self, annotation_id: int, result: list[dict], token: str | None = None,
                          lead_time: float | None = None) -> dict:
        """Change an annotation (as the user of ``token``): its ``updated_at`` moves on."""
        client = self.sdk if token is None else self._as(token)
        kw = {"lead_time": lead_time} if lead_time is not None else {}
        with self._errors(f"update annotation {annotation_id}"):
            a = client.annotations.update(id=annotation_id, result=result, **kw)
        return a.dict() if hasattr(a, "dict") else dict(a)


# -- payloads and annotations ------------------------------------------------------------------------

def box_result(box_px: Sequence[float], width: int, height: int, region_id: str | None = None) -> dict:
    """One ``rectanglelabels`` result item for a pixel box (a prediction's or an annotation's)."""
    x, y, w, h = to_percent(tuple(float(v) for v in box_px), width, height)
    return {
        "id": region_id or secrets.token_hex(5),
        "from_name": FROM_BOX, "to_name": TO_IMAGE, "type": "rectanglelabels",
        "original_width": int(width), "original_height": int(height), "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [BOX_LABEL]},
    }


def decision_result(decision: str) -> dict:
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, not {decision!r}")
    return {"id": secrets.token_hex(5), "from_name": FROM_DECISION, "to_name": TO_IMAGE, "type": "choices",
            "value": {"choices": [decision]}}


def text_result(text: str) -> dict:
    return {"id": secrets.token_hex(5), "from_name": FROM_TEXT, "to_name": TO_IMAGE, "type": "textarea",
            "value": {"text": [text]}}


def task_payload(sample: dict, image: dict, image_url: str, model_version: str) -> dict:
    """The Label Studio task of one sample (an ``expressions`` row) on its image (an ``images`` row).

    ``data`` holds what the labelling view shows and what a pull needs back (``sample_id``); the proposed
    box (``gt_box``) of a positive is a prediction in percent of the image; a negative has none.
    """
    negative = sample.get("polarity") == "negative"
    width, height = int(image["width"]), int(image["height"])
    data = {
        "image": image_url,
        "expression": sample["text"],
        "sample_id": sample["sample_id"],
        "polarity": sample.get("polarity") or "positive",
        "question": NEGATIVE_QUESTION if negative else POSITIVE_QUESTION,
    }
    for key in ("task", "difficulty", "negative_type", "needs_review"):
        if sample.get(key) is not None:
            data[key] = sample[key]
    result = []
    if not negative and sample.get("gt_box") is not None:
        result.append(box_result(sample["gt_box"], width, height, region_id="proposed"))
    score = sample.get("score")
    return {
        "data": data,
        "predictions": [{"model_version": model_version, "score": float(score) if score is not None else 1.0,
                         "result": result}],
    }


def read_annotation(ann: dict, width: int, height: int) -> tuple[str | None, tuple | None, str | None]:
    """``(decision, fixed_box_px | None, fixed_text | None)`` of one Label Studio annotation.

    The box is the last ``target`` rectangle, in pixels of the ``width`` x ``height`` stored image (not
    clipped: a caller drops a box outside the image). A drawn box without a decision counts as ``fix``;
    no decision and no box gives ``None``. ``original_width/height`` of the result, when the server
    saw another size, scale the percent box all the same (percent is size-free).
    """
    decision = text = box = None
    for item in ann.get("result") or []:
        kind, value = item.get("type"), item.get("value") or {}
        if kind == "choices" and item.get("from_name") == FROM_DECISION:
            choices = value.get("choices") or []
            decision = choices[0] if choices else None
        elif kind == "rectanglelabels" and item.get("from_name") == FROM_BOX:
            if all(k in value for k in ("x", "y", "width", "height")):
                box = from_percent((value["x"], value["y"], value["width"], value["height"]), width, height)
        elif kind == "textarea" and item.get("from_name") == FROM_TEXT:
            texts = value.get("text") or []
            text = " ".join(t.strip() for t in texts if t and t.strip()) or None
    if decision is None and box is not None:
        decision = "fix"
    if decision is not None and decision not in DECISIONS:
        raise ValueError(f"unknown decision {decision!r} in annotation {ann.get('id')}")
    return decision, box, text
