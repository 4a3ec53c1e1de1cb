"""A real OpenAI-compatible model server for tests: llama-cpp-python's ``python -m llama_cpp.server``.

:class:`LlamaCppServer` runs the server from its own virtual environment (``.venv-llm``, made by
``make test`` / ``make .venv-llm/.done``: llama-cpp-python's pins may conflict with Prefect's) with
a small GGUF model (gemma-3-270m, Q4_K_M, about 250 MB) on a loopback port, in its own process
group, logging to a file::

    with LlamaCppServer() as srv:
        client = LLMClient(srv.base_url, srv.model, api_key_env=None)

The model is a base model without a chat template in its GGUF, so the server is given a chat
format (llama-cpp-python's built-in ``gemma`` format: ``<start_of_turn>user ... <end_of_turn>``).

What this server does with the OpenAI request fields refforge uses (measured with 0.3.36; asserted
in tests/refforge/llm/test_llama_cpp_server.py): ``response_format`` of type ``json_schema`` fails
request validation, which the server answers with HTTP 500 ``internal_server_error`` ("Input should
be 'text' or 'json_object'"); ``{"type": "json_object", "schema": {...}}`` constrains the answer to
the schema by a grammar; ``guided_json``, ``format`` and a top-level ``json_schema`` are ignored;
``logprobs: true`` returns nothing unless ``top_logprobs`` is set too; ``n`` is ignored (one
choice); any model name is served. The ``gemma`` chat format keeps string contents only: a message
whose content is a list of parts (text and images) is dropped whole, and so is the system message.
A prompt of ``n_ctx`` tokens or more is a 400 ``context_length_exceeded``; a shorter prompt whose
``max_tokens`` would overflow gets ``max_tokens`` lowered silently. Requests are served one at a
time (a global lock in llama_cpp/server/app.py; ``GET /v1/models`` waits for it too), and on
SIGTERM uvicorn first finishes every request in flight and queued, so :meth:`LlamaCppServer.stop`
sends SIGKILL after ``stop_timeout_s``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_MODEL_ALIAS", "LlamaCppServer", "LlamaCppServerError", "default_model_path", "default_venv"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_ALIAS = "gemma-3-270m"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
VENV_ENV = "REFFORGE_LLM_VENV"  # overrides the default venv (e.g. refforge installed from a wheel)

# llama_cpp/server/settings.py (0.3.36): ServerSettings and ModelSettings are pydantic BaseSettings
# without an env prefix, so an environment variable named like any field (API_KEY, MODEL, VERBOSE,
# CACHE, ...) changes the server; llama_cpp/server/__main__.py also reads HOST, PORT and CONFIG_FILE.
# The child gets an environment without them: only the command line configures it.
_SETTINGS_ENV = frozenset("""
api_key cache cache_size cache_type chat_format chat_template_kwargs clip_model_path config_file
disable_ping_events draft_model draft_model_num_pred_tokens embedding flash_attn hf_model_repo_id
hf_pretrained_model_name_or_path hf_tokenizer_config_path host interrupt_requests kv_overrides
last_n_tokens_size logits_all lora_base lora_path main_gpu model model_alias models mul_mat_q n_batch
n_ctx n_gpu_layers n_threads n_threads_batch n_ubatch numa offload_kqv port root_path rope_freq_base
rope_freq_scale rope_scaling_type rpc_servers seed split_mode ssl_certfile ssl_keyfile tensor_split
type_k type_v use_mlock use_mmap verbose vocab_only yarn_attn_factor yarn_beta_fast yarn_beta_slow
yarn_ext_factor yarn_orig_ctx
""".split())


class LlamaCppServerError(RuntimeError):
    """The server could not be started (venv or model missing, crashed, did not answer in time)."""


def default_venv() -> Path:
    env = os.environ.get(VENV_ENV)
    return Path(env) if env else REPO_ROOT / ".venv-llm"


def default_model_path(venv: Path | None = None) -> Path:
    return (venv or default_venv()) / "models" / MODEL_FILE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_threads() -> int:
    # decoding a 270M model is memory-bound: more than a few threads do not help, and on a small
    # machine the test process and the server share the cores
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace_s``; reaps the process."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class LlamaCppServer:
    """llama-cpp-python's OpenAI-compatible server on ``127.0.0.1``, as a context manager.

    Args:
        venv: the virtual environment with ``llama-cpp-python[server]`` (default ``<repo>/.venv-llm``,
            or ``$REFFORGE_LLM_VENV``).
        model_path: the GGUF file (default ``<venv>/models/gemma-3-270m-q4_k_m.gguf``).
        n_ctx: the context size in tokens.
        model_alias: the model id the server lists and expects in requests (:attr:`model`).
        port: 0 picks a free one.
        chat_format: one of llama-cpp-python's registered chat formats.
        n_threads: decoding (and prompt) threads; default min(4, usable cores).
        extra_args: more ``--flag value`` arguments for ``llama_cpp.server``.
        log_path: where the server's stdout and stderr go (default a new temporary file).
        startup_timeout_s: how long :meth:`start` waits for ``GET /v1/models`` to answer.
        stop_timeout_s: how long :meth:`stop` waits after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        venv: str | os.PathLike[str] | None = None,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = 2048,
        model_alias: str = DEFAULT_MODEL_ALIAS,
        port: int = 0,
        chat_format: str = "gemma",
        n_threads: int | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 120,
        stop_timeout_s: float = 10,
    ) -> None:
        self.venv = Path(venv) if venv is not None else default_venv()
        self.model_path = Path(model_path) if model_path is not None else default_model_path(self.venv)
        self.n_ctx = n_ctx
        self.model_alias = model_alias
        self.requested_port = port
        self.port: int | None = None
        self.chat_format = chat_format
        self.n_threads = n_threads or _default_threads()
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path is not None else None
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    # -- what a client needs
    @property
    def model(self) -> str:
        return self.model_alias

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise LlamaCppServerError("the llama.cpp server is not started")
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def __repr__(self) -> str:
        state = self.base_url if self.running else "stopped"
        return f"LlamaCppServer({self.model_alias!r}, {state}, log={str(self.log_path)!r})"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.port is not None

    def command(self) -> list[str]:
        """The server's command line (flags from llama_cpp/server/settings.py)."""
        return [
            str(self.python), "-m", "llama_cpp.server",
            "--model", str(self.model_path),
            "--model_alias", self.model_alias,
            "--host", "127.0.0.1",
            "--port", str(self.port if self.port is not None else self.requested_port),
            "--chat_format", self.chat_format,
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            *self.extra_args,
        ]

    # -- lifecycle
    def __enter__(self) -> LlamaCppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LlamaCppServer:
        if self.running:
            return self
        if not self.python.exists():
            raise LlamaCppServerError(
                f"llama-cpp-python's venv is missing ({self.venv}): run `make test` or `make .venv-llm/.done` "
                "to create it")
        if not self.model_path.exists():
            raise LlamaCppServerError(
                f"the GGUF model is missing ({self.model_path}): run `make .venv-llm/.done` "
                "(rm .venv-llm/.done first if the venv exists)")
        self.port = self.requested_port or _free_port()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="refforge-llama-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = {k: v for k, v in os.environ.items() if k.lower() not in _SETTINGS_ENV}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._finalizer = weakref.finalize(self, _stop_group, self.proc, self.stop_timeout_s)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        url = f"{self.base_url}/models"
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise LlamaCppServerError(
                    f"the llama.cpp server exited with code {code} while starting: {self._last_log_line()} "
                    f"(log: {self.log_path})")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise LlamaCppServerError(
                    f"the llama.cpp server did not answer GET /v1/models within {self.startup_timeout_s:g} s "
                    f"(log: {self.log_path})")
            time.sleep(0.2)

    def _last_log_line(self) -> str:
        try:
            lines = [ln.strip() for ln in Path(self.log_path).read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "?"
        return lines[-1][:300] if lines else "(empty log)"

    def stop(self) -> None:
        """SIGTERM to the server's process group, then SIGKILL after ``stop_timeout_s``."""
        if self.proc is not None:
            _stop_group(self.proc, self.stop_timeout_s)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self.port = None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m refforge.testing.llama_cpp``: start the server, print its base URL, run until stdin closes."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args(argv)
    with LlamaCppServer(port=args.port, n_ctx=args.n_ctx) as srv:
        print(srv.base_url, flush=True)
        print(f"model: {srv.model}; log: {srv.log_path}", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            sys.stdin.read()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
