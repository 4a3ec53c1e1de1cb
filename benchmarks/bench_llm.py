"""LLM client benchmark: requests/s against the local OpenAI-protocol test server, and cache lookups/s.

1. Throughput. The test server answers every request after an injected latency (100 ms by
   default), like a model server that is never the bottleneck. With ``c`` requests in flight the
   ideal rate is ``c / latency``; the table shows the measured rate as a share of it, at
   concurrency 1, 8, 64 and 256, plus the client's and the server's CPU time per request (what
   limits the share on a small machine). The server runs in its own process by default
   (``--server thread`` puts it in this process, sharing the interpreter lock with the client).
   A row runs concurrency 64 with the response cache on (every call a miss plus a write), and the
   last rows spread the latency (100 +/- 50 ms, uniform, same mean) as real servers do. What the
   client must avoid with a fixed latency is lockstep: answers that arrive together are processed
   one after the other on the client's one thread, and if the follow-up requests left only after
   the whole group was processed (aiohttp's body writer on Python 3.11 without refforge's eager
   start, see refforge.llm.client._eager_body_writes) they would come back together again, every
   wave waiting for the previous one. The ceiling is the client's CPU per request
   (the openai SDK's request building and its HTTP transport): concurrency / latency * CPU/request
   is the number of cores the client would need for the ideal rate ("client cores busy" is what
   it used). Each run uses a fresh client (as a build's stage does), warmed up with one wave of
   requests; a full garbage collection before the timed part keeps the warm-up's garbage out of it.
2. Cache. A ResponseCache of 100,000 entries: ``get`` hits and misses per second, ``request_key``
   per second, and fully cached ``run_many`` calls per second (what a resumed build pays per call).

3. ``--real-server``: instead of 1 and 2, a real model server (llama-cpp-python's, from .venv-llm,
   with gemma-3-270m; refforge.testing.llama_cpp.LlamaCppServer) answers ``--n`` structured requests
   (``--max-tokens`` each) sent (a) through LLMClient.run_many and (b) as direct HTTP calls (httpx,
   the same JSON bodies the client sent, captured from it beforehand with the test server; the same
   number of requests in flight) from this process, alternately, ``--repeats`` times. The client's
   overhead is its extra wall time as a share of the direct calls' time, with both answers compared.

    .venv/bin/python benchmarks/bench_llm.py --real-server [--n 20] [--max-tokens 32] [--real-concurrency 4]
        [--repeats 3]   (about 20 s per run of 20 requests on 2 cores)

    .venv/bin/python benchmarks/bench_llm.py [--latency-ms 100] [--rounds 10] [--repeats 3]
        [--server process|thread] [--backend auto|aiohttp|httpx] [--jitter-ms 50] [--cache-entries 100000]

Prints the median of ``--repeats`` runs. CPU times come from /proc (Linux); elsewhere they are blank.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import pydantic

from refforge.llm import CachedResponse, ChatRequest, LLMClient, ResponseCache, request_key
from refforge.testing import OpenAITestServer


def _proc_cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class _Server:
    """The test server in a subprocess (default) or in this process."""

    def __init__(self, latency_s: float, where: str, jitter_s: float = 0.0) -> None:
        self.where = where
        if where == "thread":
            self.srv = OpenAITestServer(latency_s=latency_s, latency_jitter_s=jitter_s, record_bodies=False).start()
            self.base_url = self.srv.base_url
            self.pid = os.getpid()
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from refforge.testing.openai_server import main; raise SystemExit(main())",
                 "--latency-ms", str(latency_s * 1000), "--jitter-ms", str(jitter_s * 1000), "--no-record"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.base_url = self.proc.stdout.readline().strip()
            self.pid = self.proc.pid

    def cpu(self) -> float | None:
        return None if self.where == "thread" else _proc_cpu(self.pid)

    def close(self) -> None:
        if self.where == "thread":
            self.srv.stop()
        else:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


def _requests(n: int, tag: str) -> list[dict]:
    return [
        {"messages": [{"role": "system", "content": "Rewrite the referring expression naturally."},
                      {"role": "user", "content": f"the red ball left of the blue box #{tag}-{i}"}],
         "prompt_version": "bench@1", "stage": "bench"}
        for i in range(n)
    ]


def throughput(server: _Server, concurrency: int, latency_s: float, rounds: int, backend: str,
               cache: ResponseCache | None = None) -> dict:
    client = LLMClient(server.base_url, "bench-model", api_key_env=None, concurrency=concurrency,
                       http_backend=backend, cache=cache)
    try:
        client.run_many(_requests(concurrency, f"warm{random.random()}"))  # connections, imports
        n = max(concurrency * rounds, 10)
        reqs = _requests(n, f"run{random.random()}")
        gc.collect()
        c0, s0 = time.process_time(), server.cpu()
        t0 = time.perf_counter()
        results = client.run_many(reqs)
        wall = time.perf_counter() - t0
        c1, s1 = time.process_time(), server.cpu()
        assert all(not isinstance(r, Exception) and not r.cached for r in results)
        rate = n / wall
        return {
            "rate": rate, "share": rate / (concurrency / latency_s), "n": n,
            "client_cpu_ms": (c1 - c0) / n * 1000,
            "server_cpu_ms": (s1 - s0) / n * 1000 if s0 is not None and s1 is not None else None,
            "backend": client.http_backend_in_use,
        }
    finally:
        client.close()


def cache_bench(entries: int, probes: int) -> list[tuple[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="refforge-bench-cache-"))
    cache = ResponseCache(tmp / "llm.sqlite")
    reqs = _requests(entries, "cache")
    t0 = time.perf_counter()
    keys = [request_key(model="bench-model", messages=r["messages"], prompt_version="bench@1", temperature=0)
            for r in reqs]
    key_rate = entries / (time.perf_counter() - t0)
    answer = '{"text": "the small red ball to the left of the blue box"}'
    for i in range(0, entries, 10_000):
        cache.put_many([(k, CachedResponse(answer, "stop", None, 40, 14, "bench-model", "bench", "bench@1"))
                        for k in keys[i:i + 10_000]])
    assert len(cache) == entries
    rng = random.Random(0)
    hits = [keys[rng.randrange(entries)] for _ in range(probes)]
    misses = [f"{rng.getrandbits(256):064x}" for _ in range(probes)]
    t0 = time.perf_counter()
    assert all(cache.get(k) is not None for k in hits)
    hit_rate = probes / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    assert all(cache.get(k) is None for k in misses)
    miss_rate = probes / (time.perf_counter() - t0)

    # End to end: a resumed build's calls, all answered from the cache through the client.
    client = LLMClient("http://127.0.0.1:9/v1", "bench-model", api_key_env=None, cache=cache)
    sub = [{**r, "temperature": 0} for r in reqs[:probes]]
    t0 = time.perf_counter()
    out = client.run_many(sub)
    cached_rate = probes / (time.perf_counter() - t0)
    assert all(r.cached for r in out)
    client.close()
    size_mb = cache.stats()["size_bytes"] / 1e6
    cache.close()
    return [
        (f"request_key (hash a request), {entries:,} requests", key_rate),
        (f"get, hit ({entries:,} entries, {size_mb:.0f} MB)", hit_rate),
        (f"get, miss ({entries:,} entries)", miss_rate),
        ("client.run_many, all answered from the cache", cached_rate),
    ]


class _Verdict(pydantic.BaseModel):
    # short, closed answers: a free string under a grammar runs to max_tokens on this small model
    # (measured: every answer cut off at 32 tokens), which would time the cut-offs, not the client
    refers: bool
    color: Literal["red", "blue", "green"]


def _real_requests(n: int, max_tokens: int) -> list[ChatRequest]:
    return [ChatRequest(
        messages=[{"role": "system", "content": "Does the expression refer to the ball? Answer in JSON."},
                  {"role": "user", "content": f"Expression {i}: the red ball left of the blue box."}],
        prompt_version="bench@1", stage="bench-real", temperature=0, max_tokens=max_tokens, response_schema=_Verdict)
        for i in range(n)]


def _captured_bodies(reqs: list[ChatRequest], mode: str, model: str) -> list[dict]:
    """The JSON bodies LLMClient sends for ``reqs`` (first attempts), captured with the scripted test server."""
    from refforge.testing import reply

    srv = OpenAITestServer(model=model, default=reply('{"refers": true, "color": "red"}')).start()
    try:
        client = LLMClient(srv.base_url, model, api_key_env=None, structured_output=mode, concurrency=1)
        try:
            client.run_many(reqs)
        finally:
            client.close()
        bodies = [r.body for r in srv.requests if r.path.endswith("/chat/completions")]
    finally:
        srv.stop()
    assert len(bodies) == len(reqs), f"captured {len(bodies)} bodies for {len(reqs)} requests"
    return bodies


async def _direct(base_url: str, bodies: list[dict], concurrency: int) -> list[dict]:
    import asyncio

    import httpx

    out: list[dict | None] = [None] * len(bodies)
    todo = iter(range(len(bodies)))
    async with httpx.AsyncClient(base_url=base_url, timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        async def worker() -> None:
            for i in todo:
                r = await http.post("/chat/completions", json=bodies[i])
                r.raise_for_status()
                out[i] = r.json()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return out  # type: ignore[return-value]


def real_server_bench(n: int, max_tokens: int, concurrency: int, repeats: int) -> int:
    import asyncio

    from refforge.testing.llama_cpp import LlamaCppServer

    mode = "json_object"  # llama-cpp-python's schema-constrained form (what "auto" settles on there)
    reqs = _real_requests(n, max_tokens)
    with LlamaCppServer() as srv:
        bodies = _captured_bodies(reqs, mode, srv.model)
        print(f"setup: llama-cpp-python server ({' '.join(srv.command()[3:])}), one request at a time; "
              f"client: refforge LLMClient(structured_output={mode!r}, concurrency={concurrency}) run_many vs "
              f"httpx.AsyncClient with the same {n} bodies and {concurrency} in flight; max_tokens {max_tokens}; "
              f"temperature 0; {os.cpu_count()} cores; python {sys.version.split()[0]}; "
              f"load average {_loadavg()}")
        asyncio.run(_direct(srv.base_url, bodies[:1], 1))  # warm-up: model pages, first-request costs
        rows = []
        for rep in range(repeats):
            for kind in (("client", "direct") if rep % 2 == 0 else ("direct", "client")):
                gc.collect()
                c0 = time.process_time()
                t0 = time.perf_counter()
                if kind == "client":
                    client = LLMClient(srv.base_url, srv.model, api_key_env=None, structured_output=mode,
                                       concurrency=concurrency, timeout_s=300)
                    try:
                        results = client.run_many(reqs, raise_request_errors=False)
                        wall = time.perf_counter() - t0
                        usage = client.usage().get("bench-real", {})
                    finally:
                        client.close()
                    ok = sum(1 for r in results if not isinstance(r, Exception))
                    texts = [r.text if not isinstance(r, Exception) else None for r in results]
                    http_n, tokens = usage.get("http_requests", n), usage.get("completion_tokens", 0)
                else:
                    answers = asyncio.run(_direct(srv.base_url, bodies, concurrency))
                    wall = time.perf_counter() - t0
                    texts = [a["choices"][0]["message"]["content"] for a in answers]
                    ok = sum(1 for t in texts if _parses(t))
                    http_n, tokens = len(bodies), sum(a["usage"]["completion_tokens"] for a in answers)
                rows.append({"rep": rep, "kind": kind, "wall": wall, "cpu": time.process_time() - c0, "ok": ok,
                             "http": http_n, "tokens": tokens, "texts": texts})

    print()
    print("| run | path | wall s | requests/s | s/request | completion tokens | tokens/s | HTTP requests | valid answers "
          "| this process's CPU/request |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rep']} | {r['kind']} | {r['wall']:.2f} | {n / r['wall']:.2f} | {r['wall'] / n:.3f} | {r['tokens']} "
              f"| {r['tokens'] / r['wall']:.1f} | {r['http']} | {r['ok']}/{n} | {r['cpu'] / n * 1000:.1f} ms |")
    client_rows = [r for r in rows if r["kind"] == "client"]
    direct_rows = [r for r in rows if r["kind"] == "direct"]
    cw = sorted(r["wall"] for r in client_rows)[len(client_rows) // 2]
    dw = sorted(r["wall"] for r in direct_rows)[len(direct_rows) // 2]
    same = all(c["texts"] == d["texts"] for c, d in zip(client_rows, direct_rows, strict=True))
    extra_cpu = (sum(r["cpu"] for r in client_rows) / len(client_rows)
                 - sum(r["cpu"] for r in direct_rows) / len(direct_rows)) / n
    print()
    print("| summary | client (median) | direct (median) | client overhead, share of request time | "
          "client's extra CPU/request | same answers |")
    print("|---|---|---|---|---|---|")
    print(f"| {n} requests, max_tokens {max_tokens}, {concurrency} in flight | {cw:.2f} s | {dw:.2f} s | "
          f"{(cw - dw) / dw:+.1%} | {extra_cpu * 1000:.1f} ms | {same} |")
    return 0


def _parses(text: str) -> bool:
    try:
        _Verdict.model_validate_json(text)
        return True
    except pydantic.ValidationError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--rounds", type=int, default=10, help="requests per run = concurrency x rounds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--server", choices=["process", "thread"], default="process")
    ap.add_argument("--backend", choices=["auto", "aiohttp", "httpx"], default="auto")
    ap.add_argument("--cache-entries", type=int, default=100_000)
    ap.add_argument("--cache-probes", type=int, default=20_000)
    ap.add_argument("--jitter-ms", type=float, default=50.0,
                    help="also run concurrency >= 64 with latency +/- this (uniform, same mean); 0: skip")
    ap.add_argument("--skip-cache", action="store_true")
    ap.add_argument("--real-server", action="store_true",
                    help="benchmark against llama-cpp-python's server (from .venv-llm) instead")
    ap.add_argument("--n", type=int, default=20, help="--real-server: requests per run")
    ap.add_argument("--max-tokens", type=int, default=32, help="--real-server: max_tokens per request")
    ap.add_argument("--real-concurrency", type=int, default=4, help="--real-server: requests in flight")
    args = ap.parse_args(argv)
    if args.real_server:
        return real_server_bench(args.n, args.max_tokens, args.real_concurrency, args.repeats)
    latency = args.latency_ms / 1000

    import openai

    load0 = _loadavg()
    backend = args.backend if args.backend != "auto" else "aiohttp"  # auto: aiohttp (openai[aiohttp] is core)
    print(f"setup: client = refforge LLMClient -> openai {openai.__version__} AsyncOpenAI.post -> {backend} HTTP "
          f"transport{' (bodies written eagerly)' if backend == 'aiohttp' else ''}, on one event loop thread; server = refforge.testing.openai_server "
          f"({'a separate process' if args.server == 'process' else 'a thread of this process'}, asyncio protocol, "
          f"{args.latency_ms:g} ms injected latency); {os.cpu_count()} cores, python {sys.version.split()[0]}, "
          f"median of {args.repeats} runs of concurrency x {args.rounds} requests")
    configs = [(c, 0.0, False) for c in args.concurrency]
    if 64 in args.concurrency:
        configs.append((64, 0.0, True))
    if args.jitter_ms:
        configs += [(c, args.jitter_ms / 1000, False) for c in args.concurrency if c >= 64]
    rows = []
    for jitter in sorted({j for _, j, _ in configs}):
        server = _Server(latency, args.server, jitter)
        try:
            for c, j, with_cache in configs:
                if j != jitter:
                    continue
                runs = []
                for _ in range(args.repeats):
                    cache = None
                    if with_cache:
                        cache = ResponseCache(Path(tempfile.mkdtemp(prefix="refforge-bench-")) / "llm.sqlite")
                    runs.append(throughput(server, c, latency, args.rounds, args.backend, cache))
                med = sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]
                rows.append((c, j, with_cache, med, [r["share"] for r in runs]))
        finally:
            server.close()

    print()
    print("| concurrency | latency | requests | requests/s | ideal | share of ideal (runs) | client CPU/req "
          "| client cores busy | server CPU/req |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, j, with_cache, r, shares in rows:
        label = f"{c}" + (" + cache" if with_cache else "")
        lat = f"{args.latency_ms:g} ms" + (f" ± {j * 1000:g}" if j else "")
        server_cpu = f"{r['server_cpu_ms']:.2f} ms" if r["server_cpu_ms"] is not None else ""
        busy = r["rate"] * r["client_cpu_ms"] / 1000  # CPU seconds per second of the client process
        print(f"| {label} | {lat} | {r['n']:,} | {r['rate']:,.0f} | {c / latency:,.0f} | {r['share']:.0%} "
              f"({', '.join(f'{s:.0%}' for s in shares)}) | {r['client_cpu_ms']:.2f} ms | {busy:.2f} | {server_cpu} |")
    print(f"\nHTTP backend: {rows[0][3]['backend'] if rows else '?'}; load average before/after: {load0} / "
          f"{_loadavg()} (other processes on the machine make the shares noisy: see the runs)")

    cache_rows = []
    if not args.skip_cache:
        print()
        print("| cache operation | per second |")
        print("|---|---|")
        cache_rows = cache_bench(args.cache_entries, args.cache_probes)
        for label, rate in cache_rows:
            print(f"| {label} | {rate:,.0f} |")

    # The summary: share of ideal per concurrency (fixed latency, no cache), and the cache figure.
    plain = {c: shares for c, j, with_cache, _, shares in rows if not j and not with_cache}
    print()
    print("| summary | " + " | ".join(f"concurrency {c}" for c in plain) + " | cache get (hit) /s |")
    print("|---|" + "---|" * (len(plain) + 1))
    cells = [f"{sorted(v)[len(v) // 2]:.0%} ({min(v):.0%}-{max(v):.0%})" for v in plain.values()]
    hit = next((f"{rate:,.0f}" for label, rate in cache_rows if label.startswith("get, hit")), "")
    print("| share of ideal, median (min-max) | " + " | ".join(cells) + f" | {hit} |")
    return 0


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
