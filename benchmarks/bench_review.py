"""Push and pull of many samples against a local Label Studio server, beside a plain SDK import of the
same tasks in the same run: what refforge's bookkeeping (selection, idempotency check, payloads,
batch records, storage rows) costs on top of the server's own import and export.

    python benchmarks/bench_review.py --build builds/demo --n 10000

The build must hold at least ``n`` samples (the demo has ~17,000). A server is started from .venv-ls
with a temporary data directory and a files root above the build, and stopped at the end. Order:
plain import into one project, then ``refforge review push`` of the same samples (the same payloads,
built by refforge's own code) into another, then ``annotate`` of ``--annotate`` tasks in each through the
API, then a plain paged task export of each project beside ``refforge review pull``. Ratios are
push / plain import and pull / plain export, in the same process.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path

from refforge.flows import review as fr
from refforge.review import labelstudio as ls
from refforge.review.server import start_server, stop_server
from refforge.stages.review_select import select_batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--annotate", type=int, default=500, help="tasks annotated in each project before the pulls")
    a = ap.parse_args(argv)
    build = a.build.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-review-") as td:
        data = Path(td) / "ls"
        os.environ.update(REFFORGE_LS_USERNAME="bench@example.com", REFFORGE_LS_PASSWORD=secrets.token_urlsafe(12),
                          REFFORGE_LS_TOKEN=secrets.token_hex(20))
        info = start_server(data, port=_free_port(), files_root=build.parent)
        os.environ.update(REFFORGE_LS_URL=info.url, REFFORGE_LS_FILES_ROOT=str(build.parent))
        try:
            return _run(build, a.n, a.annotate)
        finally:
            stop_server(data)


def _run(build: Path, n: int, n_annotate: int) -> int:
    b = fr._open(build)
    exprs = fr._expressions(b)
    images = fr._images(b)
    if len(exprs) < n:
        print(f"{build} holds {len(exprs)} samples, fewer than --n {n}")
        return 2
    client = ls.connect()
    root = build.parent
    chosen = select_batch(exprs, size=n, strategy="stratified", already=set(), seed=0)
    by_sid = {e["sample_id"]: e for e in exprs}
    version = fr.model_version(b)
    payloads = [ls.task_payload(by_sid[s], images[by_sid[s]["image_id"]],
                                ls.image_url(build / images[by_sid[s]["image_id"]]["path"], root), version)
                for s in chosen]

    plain = client.project("bench-plain")
    client.connect_storage(plain["id"], build / "images", files_root=root)
    t0 = time.perf_counter()
    plain_ids = client.import_tasks(plain["id"], payloads, batch=500)
    t_plain = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = fr.push(build, "bench-refforge", size=n, strategy="stratified")
    t_push = time.perf_counter() - t0
    assert res.sent == n and len(plain_ids) == n, (res.sent, len(plain_ids))

    for ids in (plain_ids, res.task_ids):
        for tid in ids[:n_annotate]:
            client.annotate(tid, [ls.decision_result("accept")], lead_time=1.0)

    t0 = time.perf_counter()
    plain_tasks = client.tasks(plain["id"])
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    pulled = fr.pull(build, "bench-refforge")
    t_pull = time.perf_counter() - t0
    assert len(plain_tasks) == n

    print(f"Label Studio {client.url} · build {build.name} · {n} samples · {n_annotate} annotated")
    print(f"{'step':34s} {'seconds':>8s} {'tasks/s':>9s}")
    for name, t in (("plain SDK import (500 a request)", t_plain), ("refforge review push", t_push),
                    ("plain paged task export", t_export), ("refforge review pull", t_pull)):
        print(f"{name:34s} {t:8.2f} {n / t:9.0f}")
    print(f"push / plain import: {t_push / t_plain:.3f} (bookkeeping {100 * (t_push / t_plain - 1):+.1f}%)")
    print(f"pull / plain export: {t_pull / t_export:.3f} (bookkeeping {100 * (t_pull / t_export - 1):+.1f}%); "
          f"{getattr(pulled, 'written', pulled)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
