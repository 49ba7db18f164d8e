"""The in-process sections of gpu_check, which runs each as `python -m benchmarks.gpu_workers NAME [--smoke]` in
its own subprocess: env, kernels (every kernel's Triton path against its torch path at gpt2-xl shapes:
flash-attention's error rule and CUDA-event kernel times), compile (gpt2 + LoRA through `compile_model` under bf16
autocast at several lengths: graph breaks, new graphs per length, loss vs eager), decode and decode_inductor (our
CUDA-graph, and inductor-compiled + CUDA-graph, decode step with LoRA vs eager decoding, greedy).

A worker reports its result as one line, MARK + JSON (`report`), as often as it likes: the orchestrator keeps
the last one, also when the worker is killed at its timeout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from rlhf_fast.benchmarking.harness import time_fn, time_kernels

MARK = "GPU_CHECK_RESULT "  # a worker's last line: MARK + its result as JSON
WORKERS: dict[str, Callable] = {}  # section name -> fn(smoke) -> result dict


def worker(name: str):
    def register(fn):
        WORKERS[name] = fn
        return fn
    return register


def result(status: str, numbers: dict | None = None, detail: str = "", error: str = "",
           targets: list | None = None) -> dict:
    """A section's result; targets: the judged ones, [{what, value, target, met}] (met None: not judged)."""
    return {"status": status, "numbers": numbers or {}, "detail": detail, "error": error, "targets": targets or []}


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

@worker("env")
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


# --- kernels: bf16 Triton vs the torch (library) path, flash-attention's error rule, kernel times ------


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


@worker("kernels")
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
            # CUDA-event kernel time (host hidden); the torch path is the library one (cuBLAS-first LoRA, SDPA)
            ms = {b: 1e3 * time_kernels(step, device=device, warmup=1, iters=iters)[0] for b, step in steps.items()}
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
    detail = "; ".join(parts) + (" (err = kernel error / (2 x eager error + atol) <= 1; x = torch / triton fwd+bwd "
                                 "kernel time, torch = the library path: cuBLAS-first LoRA, SDPA)")
    return result("FAIL" if failed else "PASS", numbers, detail, error=f"failed: {', '.join(failed)}" if failed else "")


# --- compile and decode --------------------------------------------------------------------------------


def use_compile_backend(smoke: bool) -> None:
    """--smoke: every torch.compile (also generate's decode step) traces with dynamo but skips code
    generation (aot_eager), so graph breaks and recompiles are real and a CPU run takes seconds."""
    if smoke:
        import torch

        torch.compile = functools.partial(torch.compile, backend="aot_eager")


@worker("compile")
def compile_section(smoke: bool) -> dict:
    """gpt2 + LoRA through `compile_model` (regional: one compiled Block region) under bf16 autocast, fwd+bwd at
    several lengths: no graph break, no new graph for a new length (dynamic shapes), the loss of eager."""
    import copy

    import torch
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    from rlhf_fast.model import GPT, add_lora, compile_model, region_graphs

    use_compile_backend(smoke)
    torch._logging.set_logs(recompiles=True, graph_breaks=True)  # reasons go to the log
    device, sync = device_and_sync(smoke)
    backend = "torch" if smoke else "triton"
    preset, B, lengths = ("tiny", 2, (9, 17)) if smoke else ("gpt2", 8, (128, 256, 384, 512))
    torch.manual_seed(0)
    model = GPT.from_preset(preset, attn_backend=backend, kernel_backend=backend).to(device)
    add_lora(model, "policy", rank=8)
    eager_model = copy.deepcopy(model)  # compile_model compiles in place
    compiled = compile_model(model, backend="aot_eager" if smoke else "inductor")
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
        numbers.setdefault("graphs_after_first_length", region_graphs())
        report(result("PASS", numbers, f"compiled {preset} fwd+bwd at T={T}"))
    numbers["graph_breaks"] = sum(counters["graph_break"].values())
    numbers["graphs"] = region_graphs()
    numbers["new_graphs_for_new_lengths"] = numbers["graphs"] - numbers["graphs_after_first_length"]
    eager = loss_of(eager_model, ids, mask)
    numbers["loss_rel_diff_vs_eager"] = abs(loss.item() - eager.item()) / abs(eager.item())
    detail = (f"{preset} B={B} T={'/'.join(map(str, lengths))} (compile_model): "
              f"graph breaks {numbers['graph_breaks']}, graphs {numbers['graphs']} "
              f"(+{numbers['new_graphs_for_new_lengths']} for new lengths), "
              f"loss vs eager {numbers['loss_rel_diff_vs_eager']:.1e}")
    if numbers["graph_breaks"]:
        return result("FAIL", numbers, detail, error=f"graph breaks: {dict(counters['graph_break'])}"[:240])
    if numbers["new_graphs_for_new_lengths"]:
        return result("FAIL", numbers, detail, error="a new length compiled a new graph (dynamic shapes expected)")
    if not numbers["loss_rel_diff_vs_eager"] < 2e-2:
        return result("FAIL", numbers, detail, error="compiled loss differs from eager")
    return result("PASS", numbers, detail)


def decode_check(smoke: bool, fast: str) -> dict:
    """Greedy tokens of our `fast` decode path (cuda_graph, or inductor: compiled, then graph-captured) against
    eager decoding, gpt2 bf16 with a LoRA adapter that changes the outputs; tokens/s of both. A path that fell
    back to eager (generate warns and goes on) fails: it was not what was asked for."""
    import warnings

    import torch

    from rlhf_fast.benchmarking.generation_bench import ours_kwargs
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
    # smoke (CPU): the fast path's plumbing with the default step (CUDA graphs need CUDA)
    paths = {"eager": ours_kwargs("eager", device), fast: dict(compile=False) if smoke and fast == "cuda_graph"
             else ours_kwargs(fast, device)}
    numbers, outs, fell_back = {}, {}, []
    for name, kw in paths.items():
        run = functools.partial(generate, model, ids, mask, max_new_tokens=N, do_sample=False, **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            outs[name] = run()
            sync()
        numbers[f"{name}_first_s"] = time.perf_counter() - t0
        # generate's fall-backs: "...; decoding eagerly" (no CUDA graph), "...; decoding without it" (no compile)
        fell_back += [f"{name}: {w.message}" for w in caught if "decoding" in str(w.message)]
        numbers[f"{name}_tok_s"] = B * N / time_fn(run, device=device, warmup=1, iters=2)
        report(result("PASS", numbers))
    eager, comp = outs["eager"].sequences, outs[fast].sequences
    same = (eager == comp).all(dim=1)
    numbers["rows_identical"] = f"{int(same.sum())}/{B}"
    # bf16 greedy may flip between near-tied logits: judge each row's first divergence by the eager
    # model's logit margin there (a real bug picks tokens far from the top, not near-ties).
    worst = 0.0
    for b in (~same).nonzero().flatten().tolist():
        j = int((eager[b] != comp[b]).nonzero()[0])
        with torch.no_grad():
            logits = model(eager[b:b + 1, :j], outs["eager"].attention_mask[b:b + 1, :j])[0, -1].float()
        worst = max(worst, float(logits[eager[b, j]] - logits[comp[b, j]]) / float(logits.abs().max()))
    numbers["worst_margin_rel"] = worst
    detail = (f"{preset} {str(dtype)[6:]} LoRA B={B} P={P} N={N}: rows identical {numbers['rows_identical']}, "
              f"tok/s eager {numbers['eager_tok_s']:.0f}, {fast} {numbers[f'{fast}_tok_s']:.0f} "
              f"(first call {numbers[f'{fast}_first_s']:.1f} s)")
    if fell_back and not smoke:
        return result("FAIL", numbers, detail, error=f"fell back to eager: {'; '.join(fell_back)}"[:240])
    if worst > 0.02:
        return result("FAIL", numbers, detail, error=f"{fast} tokens differ beyond near-ties (margin {worst:.3f})")
    return result("PASS", numbers, detail)


@worker("decode")
def decode_section(smoke: bool) -> dict:
    return decode_check(smoke, "cuda_graph")


@worker("decode_inductor")
def decode_inductor_section(smoke: bool) -> dict:
    return decode_check(smoke, "inductor")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=sorted(WORKERS))
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny sizes, interpreter, aot_eager")
    args = p.parse_args(argv)
    run_worker(args.section, args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
