"""Load on `rlhf-fast serve`: N concurrent clients on loopback, each sending POST /v1/completions with a fixed
max_tokens one after another, against the server with dynamic batching on (--max-batch-size 16
--batch-window-ms 20) and off (--max-batch-size 1: one request at a time), side by side in one run.
Per mode: generated tokens/s (from each response's `usage.completion_tokens`, over the wall time from the
first request to the last reply), requests/s, p50/p95 latency per request; then batched / unbatched.

    python -m benchmarks.bench_serve                                # CPU: demo preset, 16 clients
    python -m benchmarks.bench_serve --model gpt2                   # GPU: record to benchmarks/results/
    python -m benchmarks.bench_serve --smoke --out-dir DIR          # tiny, few requests, seconds (tests)

Target (issue 17): with 16 concurrent clients on the `demo` preset on CPU, batched serving gives >= 3x the
tokens/s of one-at-a-time serving at no worse p95 latency. Each mode gets its own server process and one
untimed warm-up round (every client once) before the timed requests. The servers inherit this environment:
on a shared, oversubscribed CPU machine OMP_NUM_THREADS=1 avoids torch's threads waiting on each other.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from rlhf_fast.benchmarking.harness import environment, print_table, print_targets, suite_parser, write_record

REPO = Path(__file__).resolve().parents[1]  # the servers run this checkout's rlhf_fast
TOKENS_RATIO_TARGET = 3.0  # batched tokens/s >= 3x unbatched ...
P95_RATIO_TARGET = 1.0  # ... at no worse p95 latency
SMOKE = dict(model="tiny", clients=4, requests_per_client=2, max_tokens=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`rlhf-fast serve` in a subprocess on a free loopback port, up once GET /health answers 200."""

    def __init__(self, model: str, serve_args: list[str], log_dir: Path, startup_s: float):
        self.port = free_port()
        self.log_path = log_dir / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "rlhf_fast.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), *serve_args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.pop("RLHF_FAST_API_KEY", None)  # the clients send no key: a key set in this shell would 401 them
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(startup_s)
        except BaseException:
            self.close()
            raise

    def _wait_healthy(self, startup_s: float) -> None:
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rlhf-fast serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.2)
        raise RuntimeError(f"rlhf-fast serve: no /health within {startup_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def get_json(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            res = conn.getresponse()
            body = res.read()
            if res.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {res.status}: {body[:500]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def client(port, model, prompts, args, start, max_seconds, out, errors):
    """One client: its prompts one after another on one keep-alive connection, starting none after max_seconds.
    Appends (latency_s, completion_tokens, finish time) per request to `out`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
    headers = {"Content-Type": "application/json"}
    try:
        start.wait()
        deadline = time.perf_counter() + max_seconds
        for prompt in prompts:
            if time.perf_counter() > deadline:
                break
            body = json.dumps(dict(model=model, prompt=prompt, max_tokens=args.max_tokens,
                                   temperature=args.temperature))
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body=body, headers=headers)
            res = conn.getresponse()
            data = res.read()
            latency = time.perf_counter() - t0
            if res.status != 200:
                raise RuntimeError(f"POST /v1/completions: HTTP {res.status}: {data[:500]!r}")
            usage = json.loads(data).get("usage") or {}
            if "completion_tokens" not in usage:
                raise RuntimeError(f"POST /v1/completions: no usage.completion_tokens in {data[:500]!r}")
            out.append((latency, usage["completion_tokens"], time.perf_counter()))
    except BaseException as e:  # reported by the main thread
        errors.append(e)
    finally:
        conn.close()


def run_clients(server, model, args, n_requests, max_seconds=float("inf"), tag="req"):
    """All clients at once, each sending n_requests prompts; returns (results, t_start)."""
    start = threading.Barrier(args.clients + 1)
    results, errors = [], []
    threads = []
    for c in range(args.clients):
        # distinct prompts of a few lengths: the server batches (and pads) unequal prompts
        prompts = [f"{tag} {c}.{r}: " + "Tell me a story about a cat. " * (1 + (c + r) % 3) for r in range(n_requests)]
        threads.append(threading.Thread(target=client, daemon=True,
                                        args=(server.port, model, prompts, args, start, max_seconds, results, errors)))
    for t in threads:
        t.start()
    start.wait()
    t_start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]}\nserver log:\n{server.log_tail()}")
    return results, t_start


def percentile(values, q):
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def bench_mode(name, serve_args, args, log_dir):
    load = os.getloadavg()[0]  # other jobs on a shared CPU machine skew both modes: recorded per mode
    server = Server(args.model, serve_args, log_dir, args.startup_timeout)
    try:
        model = server.get_json("/v1/models")["data"][0]["id"]
        run_clients(server, model, args, 1, tag="warm-up")
        before = server.get_json("/health")
        results, t_start = run_clients(server, model, args, args.requests_per_client, args.max_seconds)
        after = server.get_json("/health")
    finally:
        server.close()
    if not results:
        raise RuntimeError(f"{name}: no request finished within --max-seconds {args.max_seconds}")
    latencies = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    wall = max(r[2] for r in results) - t_start
    # requests per generate call, from the server's /health counters (None if it does not report them)
    batches = after.get("batches", 0) - before.get("batches", 0)
    mean_batch = (after["requests"] - before["requests"]) / batches if batches and "requests" in after else None
    sizes = {k: n - before.get("batch_sizes", {}).get(k, 0) for k, n in after.get("batch_sizes", {}).items()}
    return dict(mode=name, server_args=" ".join(serve_args), clients=args.clients, requests=len(results),
                completion_tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall, requests_per_s=len(results) / wall,
                p50_ms=percentile(latencies, 50) * 1e3, p95_ms=percentile(latencies, 95) * 1e3,
                mean_ms=sum(latencies) / len(latencies) * 1e3, mean_batch=mean_batch, load_1m=load,
                batch_sizes={k: n for k, n in sizes.items() if n})


def judge(batched, unbatched, judged: bool) -> tuple[dict, list[dict]]:
    comparison = dict(tokens_per_s_ratio=batched["tokens_per_s"] / unbatched["tokens_per_s"],
                      p50_ratio=batched["p50_ms"] / unbatched["p50_ms"],
                      p95_ratio=batched["p95_ms"] / unbatched["p95_ms"])
    targets = [
        dict(what="tokens/s batched / unbatched", value=comparison["tokens_per_s_ratio"],
             target=f">= {TOKENS_RATIO_TARGET:g}",
             met=comparison["tokens_per_s_ratio"] >= TOKENS_RATIO_TARGET if judged else None),
        dict(what="p95 latency batched / unbatched", value=comparison["p95_ratio"], target=f"<= {P95_RATIO_TARGET:g}",
             met=comparison["p95_ratio"] <= P95_RATIO_TARGET if judged else None),
    ]
    return comparison, targets


def parse_args(argv=None):
    p = suite_parser(__doc__)
    p.add_argument("--model", default="demo", help="preset or model directory for `rlhf-fast serve` (default demo)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--requests-per-client", type=int, default=8, help="timed requests per client (default 8)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="of every request (0 = greedy; default 1)")
    p.add_argument("--max-batch-size", type=int, default=16, help="the batched mode's --max-batch-size (default 16)")
    p.add_argument("--batch-window-ms", type=float, default=20, help="the batched mode's --batch-window-ms "
                   "(default 20)")
    p.add_argument("--max-seconds", type=float, default=300,
                   help="per mode, clients start no new request after this (default 300)")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds one request may take")
    p.add_argument("--startup-timeout", type=float, default=180, help="seconds for the server to answer /health")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    for flag in ("clients", "requests_per_client", "max_tokens", "max_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment()
    print(f"# bench_serve: {env['device']}, torch {env['torch']}, commit {env['commit']}; model {args.model}, "
          f"{args.clients} clients x {args.requests_per_client} requests, max_tokens {args.max_tokens}, "
          f"temperature {args.temperature:g}")
    modes = [("batched", ["--max-batch-size", str(args.max_batch_size), "--batch-window-ms",
                          f"{args.batch_window_ms:g}"]),
             ("unbatched", ["--max-batch-size", "1"])]
    rows = []
    with tempfile.TemporaryDirectory() as log_dir:
        for name, serve_args in modes:
            rows.append(bench_mode(name, serve_args, args, Path(log_dir)))
    batched, unbatched = rows
    # the target is stated for the demo preset with 16 clients on CPU; elsewhere the ratios are only recorded
    judged = not args.smoke and not torch.cuda.is_available() and args.model == "demo" and args.clients == 16
    comparison, targets = judge(batched, unbatched, judged)
    print()
    print_table(rows, ["mode", "server_args", "clients", "requests", "completion_tokens", "wall_s", "tokens_per_s",
                       "requests_per_s", "p50_ms", "p95_ms", "mean_ms", "mean_batch", "load_1m"])
    print(f"\nbatched / unbatched: tokens/s {comparison['tokens_per_s_ratio']:.2f}x, "
          f"p50 latency {comparison['p50_ratio']:.2f}x, p95 latency {comparison['p95_ratio']:.2f}x")
    print_targets(targets, "targets (issue 17: demo preset, 16 clients, CPU)")
    config = {k: getattr(args, k) for k in ("model", "clients", "requests_per_client", "max_tokens",
                                             "temperature", "max_batch_size", "batch_window_ms", "max_seconds",
                                             "smoke")}
    config["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")  # the servers inherit this environment
    path = write_record("serve" + ("-smoke" if args.smoke else ""), rows,
                        {"config": config, "comparison": comparison, "targets": targets}, out_dir=args.out_dir,
                        env=env)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
