"""One-call GPU validation: every GPU-only check of this project, in priority order, under a time budget.

    bash benchmarks/gpu_check.sh --budget 540                    # on the GPU machine (installs .whl/ first)
    python -m benchmarks.gpu_check --smoke --out-dir /tmp/gc     # CPU: the same plumbing at tiny sizes

Each section runs in its own subprocess with timeout = min(its cap, budget left), so a crash or hang in
one never loses the others; a section needing more than the time left is skipped. Each prints one line
`PASS|FAIL|SKIP  name  seconds  numbers`. The output directory ($OUT when set, else --out-dir) gets a
few files only (the device tool brings back at most 8): gpu_check.log (every subprocess's output),
summary.json, summary.txt, kernel_benchmarks.json (the kernel suites' records), e2e-gpt2.json and
memory-lora-xl.json. Caps are sized for --budget 515 and stretch in proportion to a larger budget.

Sections: env, pytest_gpu (`-m gpu` tier), kernels (bf16 Triton vs torch at gpt2-xl shapes, flash-attention
error rule, CUDA-event timings), compile (compiled gpt2 + LoRA under bf16 autocast at several lengths:
graph breaks, recompiles), decode (CUDA-graph decode with LoRA vs eager, greedy), bench_lora,
bench_attention, bench_ppo, bench_generation, bench_logprobs (the suites `python -m benchmarks.<name>`, short),
e2e (`rlhf-fast bench --preset gpt2`; prompt lengths from --hh-data when given), xl16 (gpt2-xl LoRA PPO under a
16 GiB cap: `python -m benchmarks.bench_memory_16gb --config lora-xl`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf_fast.benchmarking.harness import REPO_ROOT as REPO
from rlhf_fast.benchmarking.harness import time_fn

REFERENCE_BUDGET_S = 515.0  # the caps below add up to this
RESERVE_S = 3.0  # kept back for writing the summary
MARK = "GPU_CHECK_RESULT "  # a worker's last line: MARK + its result as JSON


@dataclass(frozen=True)
class Section:
    name: str
    cap_s: float  # at --budget 515
    min_s: float  # skipped when less than this is left
    run: Callable  # (Context, timeout_s) -> result dict


SECTIONS: list[Section] = []


def section(name: str, cap_s: float, min_s: float):
    def register(fn):
        SECTIONS.append(Section(name, cap_s, min_s, fn))
        return fn
    return register


def result(status: str, numbers: dict | None = None, detail: str = "", error: str = "") -> dict:
    return {"status": status, "numbers": numbers or {}, "detail": detail, "error": error}


def last_error(text: str) -> str:
    """The last `SomeError: message` of a log (else its last line): what a FAIL line shows. Also finds
    the cause inside torch.compile's wrapped errors ("... got RuntimeError('...')")."""
    errors = re.findall(r"(?:^(?:E\s+)?|got )([\w.]*(?:Error|Exception|Exit)\b[:(].*)$", text, re.M)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (errors or lines or [""])[-1].strip()[:240]


def describe(e: Exception) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{last_error(f'{type(e).__name__}: {e}')} (at {Path(frame.filename).name}:{frame.lineno})"


def report(partial: dict) -> None:
    """A worker's result so far: the parent keeps the last one, also when the worker times out."""
    print(MARK + json.dumps(partial, default=str), flush=True)


# --- running subprocesses ---------------------------------------------------------------------------


class Context:
    def __init__(self, out_dir: Path, smoke: bool, hh_data: str | None = None):
        self.out_dir, self.smoke, self.log = out_dir, smoke, out_dir / "gpu_check.log"
        self.hh_data = hh_data
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if smoke:
            self.env["TRITON_INTERPRET"] = "1"  # CPU: Triton kernels through the interpreter, as in the tests

    def run(self, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
        """Run cmd with its output appended to the log; (returncode or None on timeout, its output).
        Its own process group, so a timeout also ends its children (compile workers, pytest's)."""
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            start = log.tell()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                    env={**self.env, **(env or {})})
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        with open(self.log) as log:
            log.seek(start)
            return rc, log.read()


def command_result(rc: int | None, text: str, timeout: float, numbers: dict | None = None) -> dict:
    if rc is None:
        return result("FAIL", numbers, error=f"timeout after {timeout:.0f}s; last line: {last_error(text)}")
    return result("PASS", numbers) if rc == 0 else result("FAIL", numbers, error=f"rc {rc}: {last_error(text)}")


# --- in-process sections: run as `gpu_check.py --section NAME` in a subprocess ------------------------


WORKERS: dict[str, Callable] = {}


def worker_section(name: str, cap_s: float, min_s: float):
    def register(fn):
        WORKERS[name] = fn

        def run(ctx: Context, timeout: float) -> dict:
            cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--section", name] + ["--smoke"] * ctx.smoke
            rc, text = ctx.run(cmd, timeout)
            marked = [json.loads(ln[len(MARK):]) for ln in text.splitlines() if ln.startswith(MARK)]
            if marked and rc is not None:
                return marked[-1]
            # timed out (keep the numbers reported so far) or died before reporting (segfault, kill)
            out = command_result(1 if rc == 0 else rc, text, timeout, marked[-1]["numbers"] if marked else None)
            return {**out, "detail": marked[-1]["detail"] if marked else ""}
        section(name, cap_s, min_s)(run)
        return fn
    return register


def run_worker(name: str, smoke: bool) -> None:
    try:
        out = WORKERS[name](smoke)
    except Exception as e:  # report, never crash: the FAIL line names the error and where it was raised
        traceback.print_exc()
        out = result("FAIL", error=describe(e))
    report(out)


def device_and_sync(smoke: bool):
    import torch

    device = torch.device("cpu" if smoke else "cuda")
    return device, (torch.cuda.synchronize if device.type == "cuda" else (lambda: None))


def left_padded_mask(B: int, T: int, device, seed: int = 0, pad_frac: float = 0.4):
    """(B, T) bool, True = real token, each row left-padded by up to pad_frac * T."""
    import torch

    pads = torch.randint(0, int(pad_frac * T) + 1, (B,), generator=torch.Generator().manual_seed(seed))
    return (torch.arange(T)[None, :] >= pads[:, None]).to(device)


@worker_section("env", cap_s=10, min_s=5)
def env_section(smoke: bool) -> dict:
    import torch

    from rlhf_fast.benchmarking.monitor import environment

    env = environment()
    # The GPU machine's copy of the tree may carry no (or stale) git metadata: the caller passes the commit.
    env["commit"] = os.environ.get("GIT_COMMIT") or env["commit"]
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
    if not smoke and not torch.cuda.is_available():
        return result("FAIL", env, error="no CUDA device visible to torch")
    keys = ("device", "driver", "cuda", "torch", "triton", "transformers", "commit")
    return result("PASS", env, detail=" ".join(f"{k}={env.get(k)}" for k in keys))


@section("pytest_gpu", cap_s=110, min_s=30)
def pytest_section(ctx: Context, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={max(30, int(timeout / 2))}")
    rc, text = ctx.run(cmd, timeout)
    outcomes = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, re.M)
    counts = {k.lower(): sum(o == k for _, o in outcomes) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    bad = sorted({t for t, o in outcomes if o in ("FAILED", "ERROR")}
                 | set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
    numbers = {**counts, "failing": bad}
    detail = " ".join(f"{v} {k}" for k, v in counts.items()) + (f"; failing: {', '.join(bad)}" if bad else "")
    if rc is None:
        return result("FAIL", numbers, detail, error=f"timeout after {timeout:.0f}s (counts so far)")
    if bad or rc not in (0, 5):
        return result("FAIL", numbers, detail, error=f"rc {rc}: {last_error(text)}")
    return result("PASS" if counts["passed"] else "SKIP", numbers, detail)


# --- kernels: bf16 Triton vs torch, flash-attention's error rule, timings --------------------------


def plain_attention(q, k, v, kpm):
    """Causal + key-padding attention in plain PyTorch in the inputs' dtype (the rule's eager baseline);
    rows with no visible key are 0."""
    import torch

    T = q.shape[2]
    visible = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() & kpm[:, None, None, :]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~visible, torch.finfo(q.dtype).min).softmax(dim=-1)
    return torch.where(visible.any(dim=-1, keepdim=True), probs @ v, 0.0)


def kernel_cases(smoke: bool, device):
    """name -> (leaves, kernel(backend, **leaves), eager(**leaves), reference dtype, atol)."""
    import torch

    from rlhf_fast import kernels
    from rlhf_fast.kernels import reference

    low = torch.float32 if smoke else torch.bfloat16  # the interpreter runs fp32
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0, dtype=low, grad=False):
        return (torch.randn(*shape, generator=g) * std).to(device, dtype).requires_grad_(grad)

    N, C, OUT = (64, 48, 80) if smoke else (8 * 512, 1600, 4800)
    cases = {}
    for r in (4, 8) if smoke else (8, 128):
        leaves = dict(x=rand(N, C, grad=True), weight=rand(OUT, C, std=C**-0.5), bias=rand(OUT),
                      lora_a=rand(r, C, std=C**-0.5, grad=True), lora_b=rand(OUT, r, std=r**-0.5, grad=True))
        cases[f"lora_r{r}"] = (leaves, lambda b, **t: (kernels.lora_linear(**t, scale=2.0, backend=b),),
                               lambda **t: (reference.lora_linear(**t, scale=2.0),), torch.float64, 1e-3)
    B, H, T, D = (2, 2, 33, 16) if smoke else (8, 25, 512, 64)
    kpm = left_padded_mask(B, T, device)
    cases["attention"] = ({n: rand(B, H, T, D, grad=True) for n in "qkv"},
                          lambda b, **t: (kernels.masked_attention(**t, key_padding_mask=kpm, backend=b),),
                          lambda **t: (plain_attention(**t, kpm=kpm),), torch.float64, 1e-3)
    B, T = (4, 33) if smoke else (64, 512)
    mask = left_padded_mask(B, T, device, seed=1, pad_frac=0.25)
    f32 = dict(dtype=torch.float32)
    cases["gae"] = (dict(rewards=rand(B, T, **f32), values=rand(B, T, **f32)),
                    lambda b, **t: kernels.gae(**t, mask=mask, gamma=1.0, lam=0.95, backend=b),
                    lambda **t: reference.gae(**t, mask=mask, gamma=1.0, lam=0.95), torch.float32, 1e-4)
    old = -torch.rand(B, T, generator=g).to(device)
    ppo = dict(logprobs=(old + 0.1 * rand(B, T, **f32)).requires_grad_(), old_logprobs=old,
               advantages=rand(B, T, **f32), values=rand(B, T, grad=True, **f32), old_values=rand(B, T, **f32),
               returns=rand(B, T, **f32), ref_logprobs=old + 0.1 * rand(B, T, **f32))
    fields = lambda o: (o.loss, o.policy_loss, o.value_loss, o.kl)  # noqa: E731
    cases["ppo_loss"] = (ppo, lambda b, **t: fields(kernels.ppo_loss(**t, mask=mask, kl_coef=0.05, backend=b)),
                         lambda **t: fields(reference.ppo_loss(**t, mask=mask, kl_coef=0.05)), torch.float32, 1e-5)
    N, C, V = (37, 48, 1001) if smoke else (4 * 1024, 1600, 50257)  # gpt2-xl's lm-head
    targets = torch.randint(0, V, (N,), generator=g).to(device)

    def unfused_logprobs(hidden, weight):  # the model before the fused kernel: logits, fp32 log-softmax
        logp = torch.log_softmax(torch.nn.functional.linear(hidden, weight).float() / 0.7, dim=-1)
        return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    cases["linear_logprobs"] = (
        dict(hidden=rand(N, C, grad=True), weight=rand(V, C, std=3 * C**-0.5)),
        lambda b, **t: tuple(kernels.linear_logprobs(**t, targets=targets, temperature=0.7, with_entropy=True,
                                                     backend=b))[:2],
        unfused_logprobs, torch.float64, 1e-3)
    return cases


def outputs_and_grads(fn, leaves: dict, dtype=None):
    """A closure running fn on copies of leaves (cast to dtype) and returning outputs + input gradients
    (cotangents: fixed random, the same for every call)."""
    import torch

    xs = {k: v.detach().to(dtype or v.dtype).requires_grad_(v.requires_grad) for k, v in leaves.items()}
    wrt = [t for t in xs.values() if t.requires_grad]
    cotangents = []

    def step():
        outs = fn(**xs)
        diff = [o for o in outs if o.requires_grad]
        if not cotangents:
            g = torch.Generator().manual_seed(1)
            cotangents.extend(torch.randn(o.shape, generator=g).to(o) for o in diff)
        return [*outs, *(torch.autograd.grad(diff, wrt, cotangents) if diff else ())]
    return step


@worker_section("kernels", cap_s=50, min_s=20)
def kernels_section(smoke: bool) -> dict:
    device, _ = device_and_sync(smoke)
    numbers, parts, failed = {}, [], []
    for name, (leaves, kernel, eager, ref_dtype, atol) in kernel_cases(smoke, device).items():
        try:
            ref = outputs_and_grads(eager, leaves, ref_dtype)()
            base = outputs_and_grads(eager, leaves)()
            steps = {b: outputs_and_grads(functools.partial(kernel, b), leaves) for b in ("triton", "torch")}
            err = lambda a, r: float((a.detach().double() - r.detach().double()).abs().max())  # noqa: E731
            ratio = max(err(a, r) / (2 * err(e, r) + atol) for a, e, r in zip(steps["triton"](), base, ref))
            iters = 1 if smoke else 20
            ms = {b: 1e3 * time_fn(step, device=device, warmup=1, iters=iters) for b, step in steps.items()}
        except Exception as e:
            traceback.print_exc()
            failed.append(name)
            numbers[f"{name}.error"] = describe(e)
            parts.append(f"{name} ERROR")
            report(result("FAIL", numbers, "; ".join(parts)))
            continue
        numbers.update({f"{name}.err_ratio": ratio, f"{name}.triton_ms": ms["triton"], f"{name}.torch_ms": ms["torch"],
                        f"{name}.x_torch": ms["torch"] / ms["triton"]})
        if not ratio <= 1.0:  # NaN fails too
            failed.append(name)
        parts.append(f"{name} err {ratio:.2f} x{ms['torch'] / ms['triton']:.2f}")
        report(result("FAIL" if failed else "PASS", numbers, "; ".join(parts)))
    detail = "; ".join(parts) + " (err = kernel error / (2 x eager error + atol) <= 1; x = torch / triton fwd+bwd)"
    return result("FAIL" if failed else "PASS", numbers, detail, error=f"failed: {', '.join(failed)}" if failed else "")


# --- compile and decode --------------------------------------------------------------------------------


def use_compile_backend(smoke: bool) -> None:
    """--smoke: every torch.compile (also generate's decode step) traces with dynamo but skips code
    generation (aot_eager), so graph breaks and recompiles are real and a CPU run takes seconds."""
    if smoke:
        import torch

        torch.compile = functools.partial(torch.compile, backend="aot_eager")


@worker_section("compile", cap_s=75, min_s=25)  # cold inductor compile: > 45 s on an H200
def compile_section(smoke: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    from rlhf_fast.model import GPT, add_lora

    use_compile_backend(smoke)
    torch._logging.set_logs(recompiles=True, graph_breaks=True)  # reasons go to the log
    device, sync = device_and_sync(smoke)
    backend = "torch" if smoke else "triton"
    preset, B, lengths = ("tiny", 2, (9, 17)) if smoke else ("gpt2", 8, (128, 256, 384, 512))
    torch.manual_seed(0)
    model = GPT.from_preset(preset, attn_backend=backend, kernel_backend=backend).to(device)
    add_lora(model, "policy", rank=8)
    compiled = torch.compile(model)
    counters.clear()
    numbers = {}

    def loss_of(m, ids, mask):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = m(ids, mask.long())
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())

    for T in lengths:
        ids = torch.randint(0, model.config.vocab_size, (B, T), device=device)
        mask = left_padded_mask(B, T, device, seed=T)
        t0 = time.perf_counter()
        loss = loss_of(compiled, ids, mask)
        loss.backward()
        sync()
        numbers[f"T{T}_first_s"] = time.perf_counter() - t0
        report(result("PASS", numbers, f"compiled {preset} fwd+bwd at T={T}"))
    numbers["graph_breaks"] = sum(counters["graph_break"].values())
    numbers["graphs"] = counters["stats"]["unique_graphs"]
    numbers["recompiles"] = max(0, numbers["graphs"] - 1 - numbers["graph_breaks"])
    eager = loss_of(model, ids, mask)
    numbers["loss_rel_diff_vs_eager"] = abs(loss.item() - eager.item()) / abs(eager.item())
    detail = (f"{preset} B={B} T={'/'.join(map(str, lengths))}: graph breaks {numbers['graph_breaks']}, "
              f"recompiles {numbers['recompiles']}, loss vs eager {numbers['loss_rel_diff_vs_eager']:.1e}")
    if numbers["graph_breaks"]:
        return result("FAIL", numbers, detail, error=f"graph breaks: {dict(counters['graph_break'])}"[:240])
    if not numbers["loss_rel_diff_vs_eager"] < 2e-2:
        return result("FAIL", numbers, detail, error="compiled loss differs from eager")
    return result("PASS", numbers, detail)


@worker_section("decode", cap_s=50, min_s=20)
def decode_section(smoke: bool) -> dict:
    import torch

    from rlhf_fast.generation import generate
    from rlhf_fast.model import GPT, add_lora

    use_compile_backend(smoke)
    device, sync = device_and_sync(smoke)
    backend, dtype = ("torch", torch.float32) if smoke else ("triton", torch.bfloat16)
    preset, B, P, N = ("tiny", 2, 8, 6) if smoke else ("gpt2", 32, 64, 64)
    torch.manual_seed(0)
    model = GPT.from_preset(preset, attn_backend=backend, kernel_backend=backend).to(device, dtype).eval()
    add_lora(model, "policy", rank=8)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): make the adapter change the outputs
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.02)
    ids = torch.randint(0, model.config.vocab_size, (B, P), device=device)
    mask = left_padded_mask(B, P, device, pad_frac=0.5).long()
    numbers, outs = {}, {}
    for compile_ in (False, True):
        run = functools.partial(generate, model, ids, mask, max_new_tokens=N, do_sample=False, compile=compile_)
        t0 = time.perf_counter()
        outs[compile_] = run()
        sync()
        numbers[f"{'compiled' if compile_ else 'eager'}_first_s"] = time.perf_counter() - t0
        numbers[f"{'compiled' if compile_ else 'eager'}_tok_s"] = B * N / time_fn(run, device=device, warmup=1, iters=2)
        report(result("PASS", numbers))
    eager, comp = outs[False].sequences, outs[True].sequences
    same = (eager == comp).all(dim=1)
    numbers["rows_identical"] = f"{int(same.sum())}/{B}"
    # bf16 greedy may flip between near-tied logits: judge each row's first divergence by the eager
    # model's logit margin there (a real bug picks tokens far from the top, not near-ties).
    worst = 0.0
    for b in (~same).nonzero().flatten().tolist():
        j = int((eager[b] != comp[b]).nonzero()[0])
        with torch.no_grad():
            logits = model(eager[b:b + 1, :j], outs[False].attention_mask[b:b + 1, :j])[0, -1].float()
        worst = max(worst, float(logits[eager[b, j]] - logits[comp[b, j]]) / float(logits.abs().max()))
    numbers["worst_margin_rel"] = worst
    detail = (f"{preset} {str(dtype)[6:]} LoRA B={B} P={P} N={N}: rows identical {numbers['rows_identical']}, "
              f"tok/s eager {numbers['eager_tok_s']:.0f} compiled {numbers['compiled_tok_s']:.0f}")
    if worst > 0.02:
        return result("FAIL", numbers, detail, error=f"compiled tokens differ beyond near-ties (margin {worst:.3f})")
    return result("PASS", numbers, detail)


# --- command sections ----------------------------------------------------------------------------------


def ratios(rows: list[dict], ids: tuple[str, ...], cols: tuple[str, ...], where=lambda r: True) -> dict:
    """{'<id values> <col>': value} for the ratio columns of a record's rows (the table's key numbers)."""
    return {" ".join(str(r.get(i)) for i in ids) + f" {c}": r[c]
            for r in rows if where(r) for c in cols if r.get(c) is not None}


def bench_section(name: str, cap_s: float, min_s: float, suite: str, gpu_args: list, smoke_args: list, keys):
    """`python -m benchmarks.<suite>`: its output goes to the log, its record into kernel_benchmarks.json."""
    def run(ctx: Context, timeout: float) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", f"benchmarks.{suite}", *(smoke_args if ctx.smoke else gpu_args),
                   "--out-dir", tmp]
            # smoke: compiled baselines run eagerly (plumbing only; CPU inductor would take minutes)
            rc, text = ctx.run(cmd, timeout, env={"TORCH_COMPILE_DISABLE": "1"} if ctx.smoke else None)
            records = sorted(Path(tmp).glob("*.json"))
            rec = json.loads(records[-1].read_text()) if records else None
        numbers = {}
        if rec is not None:  # one place for the whole run's records
            path = ctx.out_dir / "kernel_benchmarks.json"
            merged = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**merged, name: rec}, indent=1, default=str))
            numbers = {"rows": len(rec["rows"]), **keys(rec["rows"])}
        return command_result(rc, text, timeout, numbers)
    section(name, cap_s, min_s)(run)


bench_section("bench_lora", 20, 12, "bench_lora_linear", ["--shape", "8192x1600x16"], ["--smoke"],
              lambda rows: ratios(rows, ("pass_",), ("speedup_vs_baseline", "x_floor"),
                                  lambda r: r["impl"] == "triton"))
bench_section("bench_attention", 30, 20, "bench_attention", ["--iters", "5"], ["--smoke", "--iters", "1"],
              lambda rows: ratios(rows, ("T", "H", "method"), ("vs_triton",), lambda r: r.get("method") == "sdpa_mask"))
bench_section("bench_ppo", 20, 15, "bench_ppo", ["--B", "256", "--T", "512", "--iters", "10", "--compile-max-t", "0"],
              ["--smoke"], lambda rows: ratios(rows, ("bench", "B", "T"), ("x_loop", "x_eager", "x_compiled")))
bench_section("bench_generation", 25, 20, "bench_generation",
              ["--preset", "gpt2", "--batch-size", "64", "--prompt-len", "256", "--new-tokens", "64", "--warmup", "1",
               "--iters", "1"], ["--smoke"],
              lambda rows: ratios(rows, ("preset", "B"), ("x_hf", "x_nocache", "step_over_floor")))


def fused_over_unfused(rows: list[dict]) -> dict:
    """bench_logprobs: unfused / fused peak memory and time per (case, width); > 1: the fused kernel wins."""
    by = {(r["case"], r["width"], r["impl"]): r for r in rows}
    return {f"{case}.{width}.{k}": by[case, width, "unfused"][col] / r[col]
            for (case, width, impl), r in by.items() if impl == "fused" and (case, width, "unfused") in by
            for k, col in (("peak_x", "peak_mib"), ("time_x", "time_ms"))}


bench_section("bench_logprobs", 35, 20, "bench_logprobs", ["--repeats", "3", "--warmup", "1"], ["--smoke"],
              fused_over_unfused)


@section("e2e", cap_s=60, min_s=25)
def e2e_section(ctx: Context, timeout: float) -> dict:
    sizes = (["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--prompt-len", "8", "--new-tokens", "4",
              "--mini-batch-size", "2", "--backend", "torch", "--no-hf"] if ctx.smoke else
             ["--preset", "gpt2", "--batch-size", "32", "--prompt-len", "128", "--new-tokens", "64"])
    with tempfile.TemporaryDirectory() as tmp:  # the chart stays behind: the tool brings back few files
        cli = [sys.executable, "-m", "rlhf_fast.cli", "bench"]
        data = ["--data", ctx.hh_data] if ctx.hh_data and not ctx.smoke else []
        rc, text = ctx.run([*cli, *sizes, *data, "--warmup", "1", "--iters", "1", "--out-dir", tmp], timeout)
        records = list(Path(tmp).glob("e2e-*.json"))
        if not records:
            return command_result(1 if rc == 0 else rc, text, timeout)
        rec = json.loads(records[0].read_text())
        shutil.copy(records[0], ctx.out_dir / f"e2e-{rec['config']['presets'][0]}.json")
    rows = rec["rows"]  # generation rows: tokens/s; ppo and baseline rows: samples/s
    numbers = {f"{r['section']}: {r['impl'].split(' (no KV')[0]}": r.get("tokens_per_s") or r.get("samples_per_s")
               for r in rows if r["status"] == "ok"}
    for targets in rec["targets"].values():
        numbers.update({k: t["value"] for k, t in targets.items()})
    bad = [f"{r['impl']}: {r['status']}" for r in rows if r["status"] != "ok" and not r["status"].startswith("skipped")]
    out = command_result(rc, text, timeout, numbers)
    return result("FAIL", numbers, error="; ".join(bad)[:240]) if bad else out


@section("xl16", cap_s=30, min_s=25)
def xl16_section(ctx: Context, timeout: float) -> dict:
    path = ctx.out_dir / "memory-lora-xl.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_memory_16gb", "--config", "lora-xl", "--iters", "1",
           "--json", str(path)] + ["--smoke"] * ctx.smoke
    rc, text = ctx.run(cmd, timeout)
    if rc != 0 or not path.exists():
        return command_result(1 if rc == 0 else rc, text, timeout)
    row = json.loads(path.read_text())
    numbers = {k: v for k, v in row.items() if k.startswith(("peak", "iter", "predicted", "plan", "status", "model"))}
    if row["status"] != "ok":
        return result("FAIL", numbers, error=f"{row['status']}: {row.get('error', '')}"[:240])
    fits = ctx.smoke or row["peak_iter_gib"] <= 16.0
    return result("PASS" if fits else "FAIL", numbers, f"{row['model']} peak {row['peak_iter_gib']:.2f} GiB (cap 16; "
                  f"plan {row['predicted_peak_gib']:.2f} at micro-batch {row['plan_micro_batch']}"
                  f"{', checkpointing' if row['plan_grad_checkpoint'] else ''})")


# --- the orchestrator ----------------------------------------------------------------------------------


def finite(x):
    """JSON without NaN/inf (strict parsers reject them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    return [finite(v) for v in x] if isinstance(x, list) else x


def line(r: dict) -> str:
    nums = r["detail"] or " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in r["numbers"].items())
    error = f"  | {r['error']}" if r["error"] else ""
    return f"{r['status']:<4}  {r['section']:<16} {r['seconds']:6.1f}s  {nums}{error}"[:600]


def main(argv=None) -> int:
    names = [s.name for s in SECTIONS]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole run (default 540)")
    p.add_argument("--only", help=f"comma-separated sections to run, of: {','.join(names)}")
    p.add_argument("--skip", help="comma-separated sections to leave out")
    p.add_argument("--out-dir", help="output directory ($OUT wins; default benchmarks/results/gpu_check-<time>)")
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny sizes, interpreter, aot_eager")
    p.add_argument("--hh-data", help="HH-RLHF .jsonl(.gz) file or directory: the e2e section's prompt lengths "
                   "(default: synthetic)")
    p.add_argument("--section", choices=sorted(WORKERS), help=argparse.SUPPRESS)  # worker subprocess
    args = p.parse_args(argv)
    if args.section:
        run_worker(args.section, args.smoke)
        return 0
    chosen = set(args.only.split(",")) if args.only else set(names)
    skipped = set(args.skip.split(",")) if args.skip else set()
    if unknown := (chosen | skipped) - set(names):
        p.error(f"unknown section(s) {sorted(unknown)}; known: {','.join(names)}")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU here: run with --smoke for the CPU plumbing check")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(os.environ.get("OUT") or args.out_dir or REPO / "benchmarks" / "results" / f"gpu_check-{stamp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx, t_start, results = Context(out_dir, args.smoke, args.hh_data), time.monotonic(), []
    stretch = max(1.0, args.budget / REFERENCE_BUDGET_S)
    print(f"gpu_check: budget {args.budget:.0f}s, output {out_dir}", flush=True)
    for s in SECTIONS:
        left = args.budget - RESERVE_S - (time.monotonic() - t_start)
        t0 = time.monotonic()
        if s.name not in chosen or s.name in skipped:
            r = result("SKIP", detail="not selected (--only/--skip)")
        elif left < s.min_s:
            r = result("SKIP", detail=f"needs >= {s.min_s:.0f}s, {max(left, 0):.0f}s of the budget left")
        else:
            try:
                r = s.run(ctx, min(s.cap_s * stretch, left))
            except Exception as e:  # a bug in this script's own handling: say so, run the rest
                traceback.print_exc()
                r = result("FAIL", error=f"gpu_check.py crashed: {type(e).__name__}: {e}"[:240])
        results.append({"section": s.name, **r, "seconds": time.monotonic() - t0})
        print(line(results[-1]), flush=True)
    failed = [r["section"] for r in results if r["status"] == "FAIL"]
    env = next((r["numbers"] for r in results if r["section"] == "env" and r["status"] == "PASS"), {})
    summary = {"overall": "FAIL" if failed else "PASS", "failed": failed, "budget_s": args.budget,
               "elapsed_s": time.monotonic() - t_start, "smoke": args.smoke, "time_utc": stamp,
               "device": env.get("device"), "commit": env.get("commit"), "sections": results}
    (out_dir / "summary.json").write_text(json.dumps(finite(summary), indent=1, default=str))
    head = (f"gpu_check {summary['overall']} in {summary['elapsed_s']:.0f}s of {args.budget:.0f}s; "
            f"device {summary['device']}, commit {summary['commit']}" + (" (smoke)" if args.smoke else ""))
    (out_dir / "summary.txt").write_text("\n".join([head, *map(line, results)]) + "\n")
    print(head, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
