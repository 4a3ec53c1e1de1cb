"""A build's model endpoint failing as real ones do: not there at all (one line before any unit), gone
for a while (waited out up to max_outage_s, then one line, a run file with the usage, and a resume
that completes), and Ctrl-C (no request sent after it). Progress shows the model requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refforge.cli import app
from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.llm import EndpointError
from refforge.storage import Catalog
from refforge.testing import OpenAITestServer, server_error
from tests.conftest import small_config
from tests.flows.test_llm_build import model
from tests.helpers import answers_probes, is_probe, model_requests


def _config(base_url: str, **llm) -> dict:
    cfg = small_config(images=4, shard_size=2)
    cfg["negatives_text"] = {"backend": "llm"}
    cfg["llm"] = {"base_url": base_url, "model": "test-model", "api_key_env": None, "concurrency": 4, **llm}
    return cfg


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "build.toml"
    path.write_text(parse_config(cfg).to_toml())
    return path


def test_an_endpoint_that_is_not_there_is_one_line_before_any_unit(tmp_path, prefect_api):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(EndpointError):
        run_build(parse_config(cfg), tmp_path / "a")
    assert not list((tmp_path / "a" / "state").glob("*/*.json"))  # no unit ran (no ledger entry)
    run = json.loads(next((tmp_path / "a" / "runs").glob("*.json")).read_text())
    assert run["outcome"] == "failed" and "does not answer" in run["error"]
    res = CliRunner().invoke(app, ["build", "--config", str(_write(tmp_path, cfg)), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: [llm] endpoint http://127.0.0.1:{port}/v1 (model test-model) does not answer "
                      "(connection refused); start the server or fix base_url"]


def test_an_outage_past_max_outage_s_fails_with_one_line_a_run_file_and_a_resume_completes(tmp_path, prefect_api):
    def flaky(req):
        if flaky.down and not is_probe(req):
            flaky.sent += 1
            return server_error(503) if flaky.sent > 3 else model(req)  # a few answers, then the outage
        return model(req) if not is_probe(req) else "OK"

    flaky.down, flaky.sent = True, 0
    with OpenAITestServer(handler=flaky) as srv:
        cfg = _config(srv.base_url, max_outage_s=1, max_retries=0)
        out = tmp_path / "build"
        t0 = time.monotonic()
        res = CliRunner().invoke(app, ["build", "--config", str(_write(tmp_path, cfg)), "--out", str(out)])
        assert time.monotonic() - t0 < 60
        assert res.exit_code == 1
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "negatives_text: connection:" in errors[0]
        assert "unreachable for" in errors[0] and "max_outage_s 1" in errors[0] and "HTTP 503" in errors[0]
        assert "run the same command again" in errors[0]
        # the failed run left its run file, with what it sent
        (run,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
        assert run["outcome"] == "failed" and "unreachable" in run["error"]
        sent = run["model_usage"]["llm"]["negatives_text"]
        assert sent["http_requests"] >= 4 and sent["request_errors"].get("connection", 0) >= 1
        # the endpoint is back: the same command completes the build, asking only what was not answered
        flaky.down = False
        before = len(model_requests(srv))
        res = CliRunner().invoke(app, ["build", "--config", str(_write(tmp_path, cfg)), "--out", str(out)])
        assert res.exit_code == 0, res.output
        runs = sorted((json.loads(p.read_text()) for p in (out / "runs").glob("*.json")), key=lambda r: r["started"])
        assert [r["outcome"] for r in runs] == ["failed", "completed"]
        assert runs[1]["model_usage"]["llm"]["negatives_text"]["cached"] >= 3
        assert len(model_requests(srv)) > before
        with Catalog(out) as cat:
            assert cat.count("negative_candidates") > 0


def test_model_requests_show_in_the_build_progress(tmp_path, prefect_api):
    events: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def progress(stage, event, info):
        if event == "requests":
            for k, v in info.items():
                events[stage][k] += v

    with OpenAITestServer(handler=answers_probes(model)) as srv:
        record = run_build(parse_config(_config(srv.base_url)), tmp_path / "b", progress=progress)
    usage = record["model_usage"]["llm"]["negatives_text"]
    got = events["negatives_text"]
    assert got["total"] == usage["requests"] and got["done"] == usage["requests"]
    assert got["completion_tokens"] == usage["completion_tokens"] > 0


def test_ctrl_c_stops_sending_at_once(tmp_path, prefect_api):
    with OpenAITestServer(handler=answers_probes(model), latency_s=0.4) as srv:
        cfg = _config(srv.base_url, concurrency=2)
        cfg["source"]["images"] = 12
        env = {**os.environ, "PREFECT_API_URL": prefect_api}
        proc = subprocess.Popen([sys.executable, "-m", "refforge.cli", "build", "--config",
                                 str(_write(tmp_path, cfg)), "--out", str(tmp_path / "b")],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while len(model_requests(srv)) < 6:
                assert proc.poll() is None and time.monotonic() < deadline, "the build did not start asking"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            signalled = time.monotonic()
            time.sleep(1.0)  # requests in flight when Ctrl-C came may still arrive; none after
            settled = len(model_requests(srv))
            output, _ = proc.communicate(timeout=60)
            exited = time.monotonic() - signalled
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, output
        assert len(model_requests(srv)) == settled
        assert "interrupted" in output
        assert exited < 30
        run = next(json.loads(p.read_text()) for p in (tmp_path / "b" / "runs").glob("*.json"))
        assert run["outcome"] == "interrupted"


@pytest.mark.parametrize("flavour", ["llama-server", "llama-cpp-python"])
def test_a_vlm_build_on_a_text_only_server_stops_before_any_unit(flavour, tmp_path, prefect_api):
    with OpenAITestServer(flavour=flavour, vision=False) as srv:
        cfg = small_config(images=2, shard_size=2)
        cfg["cot"] = {"backend": "vlm", "k": 1}
        cfg["vlm"] = {"base_url": srv.base_url, "model": "test-model", "api_key_env": None}
        res = CliRunner().invoke(app, ["build", "--config", str(_write(tmp_path, cfg)), "--out", str(tmp_path / "b")])
        assert res.exit_code == 2
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: [vlm] endpoint {srv.base_url} (model test-model) "
                                                         "does not take images")
        assert len(srv.chat_requests()) <= 3  # the check's probes; no unit asked anything
    assert not list((tmp_path / "b" / "state").glob("*/*.json"))
