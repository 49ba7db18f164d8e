"""The generation rows, one implementation for `rlhf-fast bench` (its generation section) and
`python -m benchmarks.bench_generation` (which adds the decode step's memory floor): our engine against its
baselines on the same weights and the same left-padded prompts, greedy, exactly N new tokens per prompt.

    eager       ours, the decode step run eagerly              generate(..., cuda_graph=False)
    cuda_graph  ours, the decode step replayed as a CUDA graph  generate(..., cuda_graph=True): the CUDA default
    inductor    ours, the decode step inductor-compiled, then graph-captured   generate(..., compile=True)
    hf_static   transformers `generate` with a static cache and its decode forward torch.compiled (HF's own
                `compile_config`, what its docs recommend); compile off: the static cache, eager
    nocache     the seed's loop: a full forward over the growing sequence for every new token
inductor and hf_static pay a cold compile on their first call (`first_call_s`): the compile-heavy rows.
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
from collections.abc import Callable

import torch

from rlhf_fast.generation import generate

from .baselines import hf_copy, no_cache_generate
from .harness import time_fn
from .monitor import PhaseMemory, sync

IMPLS = {"eager": "ours eager", "cuda_graph": "ours CUDA graph", "inductor": "ours CUDA graph + inductor",
         "hf_static": "hf generate (static cache + compile)", "nocache": "no-KV-cache loop (seed)"}
OURS = ("eager", "cuda_graph", "inductor")
# GPU targets (issue 26): ours >= 2x HF static + compile and >= 30x the no-cache loop in tokens/s; the decode
# step <= 2x its memory floor (weights + live KV bytes / measured copy bandwidth)
TARGETS = {"x_hf_static": (">=", 2.0), "x_nocache": (">=", 30.0), "step_over_floor": ("<=", 2.0)}


def judge(value, op: str, bound: float, judged: bool) -> bool | None:
    """Is `value op bound`? None when not judged here (off CUDA, or no value)."""
    if value is None or not judged:
        return None
    return value >= bound if op == ">=" else value <= bound


def ours_kwargs(impl: str, device: torch.device) -> dict | str:
    """generate()'s keywords for one of our rows, or why the row cannot run here. Written against
    generate(..., compile=False, cuda_graph=None); an older generate (compile only, CUDA graphs only when
    compiled) still runs the eager and inductor rows."""
    has_graph_flag = "cuda_graph" in inspect.signature(generate).parameters
    if impl == "eager":
        return dict(compile=False, cuda_graph=False) if has_graph_flag else dict(compile=False)
    if impl == "cuda_graph":
        if device.type != "cuda":
            return "skipped (CUDA graphs need CUDA)"
        return dict(compile=False, cuda_graph=True) if has_graph_flag else "skipped (generate has no cuda_graph flag)"
    return dict(compile=True)


def hf_static_generate(hf, ids, mask, N: int, compile: bool) -> Callable:
    """HF generate with a static cache; its decode forward compiled by HF itself (fullgraph, static shapes,
    CUDA graphs: `mode="reduce-overhead"`) when `compile`."""
    kwargs = dict(cache_implementation="static")
    if compile:
        from transformers import CompileConfig

        kwargs["compile_config"] = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
    else:
        kwargs["disable_compile"] = True
    return lambda: hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N, min_new_tokens=N,
                               pad_token_id=0, **kwargs)


def timed_row(fn: Callable, *, B: int, N: int, device, warmup: int, iters: int) -> dict:
    """first_call_s (a compile or graph capture included), then the median of `iters` calls after
    `warmup - 1` more untimed ones; tokens/s and peak memory."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    with PhaseMemory(device) as mem:
        t = time_fn(fn, device=device, warmup=max(warmup - 1, 0), iters=iters)
    return {"status": "ok", "first_call_s": first, "seconds": t, "tokens_per_s": B * N / t,
            "peak_alloc_gib": mem.allocated_gib, "peak_reserved_gib": mem.reserved_gib}


def generation_rows(model, ids, mask, N: int, impls, *, device, warmup: int, iters: int, tmp,
                    compile_hf: bool = True, step_time: bool = False, on_row: Callable | None = None) -> list[dict]:
    """One row per impl (in the order given) on `model`'s weights: {impl, key, status, seconds, tokens_per_s,
    first_call_s, peak memory}; with step_time, our rows also get step_ms: the decode-only time per token,
    (t(N) - t(1)) / (N - 1), and `warnings`: what generate warned (a CUDA graph or compile that fell back to
    eager says so). An out-of-memory row records its status and the rest go on. on_row(rows) after every row
    (an incremental record)."""
    device = torch.device(device)
    B = ids.shape[0]
    model.eval()
    rows = []
    for key in impls:
        name = IMPLS[key] if key != "hf_static" or compile_hf else "hf generate (static cache, eager)"
        row = {"impl": name, "key": key}
        try:
            if key in OURS:
                kw = ours_kwargs(key, device)
                if isinstance(kw, str):
                    row["status"] = kw
                else:
                    run = functools.partial(generate, model, ids, mask, do_sample=False, **kw)
                    with warnings.catch_warnings(record=True) as caught:  # generate warns when it falls back
                        warnings.simplefilter("always")
                        row.update(timed_row(functools.partial(run, max_new_tokens=N), B=B, N=N, device=device,
                                             warmup=warmup, iters=iters))
                    if caught:
                        row["warnings"] = sorted({str(w.message)[:200] for w in caught})
                    if step_time:
                        t_one = time_fn(functools.partial(run, max_new_tokens=1), device=device, warmup=1, iters=iters)
                        row["step_ms"] = 1e3 * (row["seconds"] - t_one) / (N - 1)
            elif key == "hf_static":
                hf = hf_copy(model, tmp, model.lm_head.weight.dtype, device)
                fn = hf_static_generate(hf, ids, mask, N, compile_hf)
                row.update(timed_row(fn, B=B, N=N, device=device, warmup=warmup, iters=iters))
                del hf, fn
            else:
                fn = lambda: no_cache_generate(model, ids, mask, N)  # noqa: E731
                row.update(timed_row(fn, B=B, N=N, device=device, warmup=min(warmup, 1), iters=iters))
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            row["status"] = f"out of memory: {str(e).splitlines()[0][:120]}"
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    eager = next((r["seconds"] for r in rows if r["key"] == "eager" and r.get("seconds")), None)
    for r in rows:
        if r.get("seconds") and eager:
            r["x_vs_ours_eager"] = r["seconds"] / eager
    return rows


def decode_floor_bytes(model, B: int, P: int, N: int, dtype: torch.dtype) -> float:
    """Bytes one decode step must read at least: every weight + the KV of the live tokens (mean over the steps)."""
    c = model.config
    elt = torch.empty((), dtype=dtype).element_size()
    kv = 2 * c.n_layer * B * c.n_embd * (P + N / 2) * elt
    return model.num_parameters() * elt + kv


def generation_targets(rows: list[dict], floor_s: float | None, on_gpu: bool) -> list[dict]:
    """The judged targets of one (preset, B) group of rows: ours = the CUDA-graph row (the engine's CUDA
    default), else the eager one. x = the baseline's seconds / ours. met is None off CUDA, and against an
    HF row that was not compiled."""
    ok = {r["key"]: r for r in rows if r.get("seconds")}
    ours = ok.get("cuda_graph") or ok.get("eager")
    if ours is None:
        return []
    out = []

    def add(name, what, value, judged=True):
        op, bound = TARGETS[name]
        out.append({"name": name, "what": what, "value": value, "target": f"{op} {bound:g}",
                    "met": judge(value, op, bound, on_gpu and judged)})

    if "hf_static" in ok:
        hf = ok["hf_static"]
        add("x_hf_static", f"tokens/s {ours['impl']} / {hf['impl']}", hf["seconds"] / ours["seconds"],
            judged="compile" in hf["impl"])
    if "nocache" in ok:
        add("x_nocache", f"tokens/s {ours['impl']} / no-KV-cache loop", ok["nocache"]["seconds"] / ours["seconds"])
    if ours.get("step_ms") is not None and floor_s:
        add("step_over_floor", f"decode step of {ours['impl']} / memory floor", ours["step_ms"] / (1e3 * floor_s))
    return out
