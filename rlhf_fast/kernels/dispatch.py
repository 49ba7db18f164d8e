"""What `backend="auto"` picks, from recorded GPU runs: a table shipped in the package.

A custom kernel earns `auto` only with a recorded win. `dispatch_table.json` (beside this file) holds
rows measured on GPUs by `python -m benchmarks.bench_lora_linear --write-dispatch`,
`python -m benchmarks.bench_attention --write-dispatch` and every gpu_check run (whose record carries the
rows it measured; `python -m benchmarks.dispatch_table --merge <record dir>` adds them). A row says, for
one key, which backend was fastest by CUDA-event kernel time:

    {"kernel": "lora_linear", "key": "sm90x132|bfloat16|1600|4800|r8|t4096", "winner": "triton",
     "ms": {"torch": 0.81, "triton": 0.72}, "device": "NVIDIA H100 80GB HBM3", "source": "..."}

Keys are (GPU arch and SM count, dtype, the kernel's shape, rank bucket, token bucket); see `lora_key`
and `attention_key`. A key that is not in the table gets the library path (`DEFAULT`): the cuBLAS-first
LoRA-linear, SDPA attention. The table is read once, at the first lookup on a CUDA device (never at
import), and a lookup is constant under torch.compile. Under compile with a symbolic token count the
token bucket is unknown: the row is then used only when every token bucket of that key agrees.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
DEFAULT = {"lora_linear": "torch", "masked_attention": "torch"}  # the library paths
WINNERS = {"lora_linear": ("torch", "triton"), "masked_attention": ("torch", "triton")}


def bucket(n: int, lo: int) -> int:
    """The power of two >= n (at least lo): token counts and ranks share a row within a bucket."""
    b = lo
    while b < n:
        b *= 2
    return b


def _constant_under_compile(fn):  # as in kernels/__init__.py: dynamo runs it at trace time
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile  # torch.cuda queries would break the graph
def device_key(device: torch.device) -> str:
    """sm<arch>x<SMs>: cards that share both run the same kernels at the same occupancy."""
    from . import launch

    return f"sm{launch.arch(device)}x{launch.num_sms(device)}"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def lora_key(device, dtype, in_features: int, out_features: int, rank: int, tokens: int | None) -> str:
    tok = "t*" if tokens is None else f"t{bucket(tokens, 256)}"
    return f"{device_key(device)}|{_dtype(dtype)}|{in_features}|{out_features}|r{bucket(rank, 8)}|{tok}"


def attention_key(device, dtype, heads: int, head_dim: int, tq: int | None, tk: int | None, padded: bool) -> str:
    """Prefill/training (tq == tk) and decode (tq < tk) buckets differ; so do padded and unpadded batches."""
    shape = "t*" if tq is None or tk is None else f"q{bucket(tq, 1)}k{bucket(tk, 64)}"
    return f"{device_key(device)}|{_dtype(dtype)}|h{heads}|d{head_dim}|{shape}|{'pad' if padded else 'nopad'}"


def _table() -> dict[tuple[str, str], str]:
    return _table_at(str(TABLE_PATH))


@functools.cache
def _table_at(path: str) -> dict[tuple[str, str], str]:
    """{(kernel, key): winner}, plus (kernel, key with t*) for keys whose token buckets all agree."""
    rows = load_rows(Path(path))
    table = {(r["kernel"], r["key"]): r["winner"] for r in rows}
    by_shape: dict[tuple[str, str], set[str]] = {}
    for (kernel, key), winner in table.items():
        stem = key.rsplit("|t", 1)[0] if kernel == "lora_linear" else _without_shape(key)
        by_shape.setdefault((kernel, stem), set()).add(winner)
    for (kernel, stem), winners in by_shape.items():
        if len(winners) == 1:
            full = f"{stem}|t*" if kernel == "lora_linear" else _with_any_shape(stem)
            table[(kernel, full)] = winners.pop()
    return table


def _without_shape(key: str) -> str:
    parts = key.split("|")
    return "|".join(parts[:4] + parts[5:])


def _with_any_shape(stem: str) -> str:
    parts = stem.split("|")
    return "|".join(parts[:4] + ["t*"] + parts[4:])


def is_gpu_row(r) -> bool:
    """A row the table may hold: a known kernel and winner, a GPU key (sm<arch>x<SMs>|...) and the GPU's name."""
    return (isinstance(r, dict) and r.get("kernel") in WINNERS and r.get("winner") in WINNERS[r["kernel"]]
            and str(r.get("key", "")).startswith("sm") and bool(r.get("device")))


def load_rows(path: Path = TABLE_PATH) -> list[dict]:
    """The table's rows (none when the file is absent)."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = data.get("rows", []) if isinstance(data, dict) else []
    for r in rows:
        if not is_gpu_row(r):
            raise ValueError(f"{path}: bad dispatch row {r!r}")
    return rows


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """old with new's rows added; a new row replaces an old one of the same (kernel, key). Sorted."""
    merged = {(r["kernel"], r["key"]): r for r in old}
    merged.update({(r["kernel"], r["key"]): r for r in new})
    return [merged[k] for k in sorted(merged)]


def write_rows(rows: list[dict], path: Path = TABLE_PATH) -> Path:
    body = {"about": "what backend='auto' picks per key, from recorded GPU runs (rlhf_fast/kernels/dispatch.py)",
            "rows": rows}
    path.write_text(json.dumps(body, indent=1) + "\n")
    _table_at.cache_clear()
    return path


@_constant_under_compile
def _winner(kernel: str, key: str) -> str:
    return _table().get((kernel, key), DEFAULT[kernel])


def _static(n):
    """n as an int, or None when it is symbolic (torch.compile with dynamic shapes)."""
    return n if isinstance(n, int) else None


def lora_backend(x: torch.Tensor, weight: torch.Tensor, rank: int) -> str:
    """The recorded winner for this LoRA-linear call on a CUDA device ("torch" elsewhere)."""
    if x.device.type != "cuda":
        return DEFAULT["lora_linear"]
    out_f, in_f = weight.shape
    tokens = _static(x.numel() // in_f) if in_f else 0
    return _winner("lora_linear", lora_key(x.device, x.dtype, in_f, out_f, rank, tokens))


def attention_backend(q: torch.Tensor, k: torch.Tensor, padded: bool) -> str:
    """The recorded winner for this attention call on a CUDA device ("torch", i.e. SDPA, elsewhere)."""
    if q.device.type != "cuda":
        return DEFAULT["masked_attention"]
    _, H, tq, D = q.shape
    key = attention_key(q.device, q.dtype, H, D, _static(tq), _static(k.shape[2]), padded)
    return _winner("masked_attention", key)


def describe_auto(device: torch.device, dtype: torch.dtype, presets: dict[str, tuple[int, int]],
                  tokens: int = 4096, rank: int = 8) -> list[str]:
    """One line per preset: what `auto` picks for its LoRA linears and attention at `tokens` tokens.
    presets: name -> (n_embd, n_head)."""
    lines = []
    for name, (C, H) in presets.items():
        if device.type != "cuda":
            lines.append(f"{name}: lora_linear torch (cuBLAS-first), attention torch (SDPA): not a CUDA device")
            continue
        shapes = {"c_attn": (C, 3 * C), "c_proj": (C, C), "c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
        picks = {n: _winner("lora_linear", lora_key(device, dtype, i, o, rank, tokens)) for n, (i, o) in shapes.items()}
        attn = _winner("masked_attention", attention_key(device, dtype, H, C // H, 512, 512, True))
        lora = ", ".join(f"{n} {p}" for n, p in picks.items())
        lines.append(f"{name}: lora_linear r{rank} x {tokens} tokens: {lora}; attention T=512 padded: {attn}")
    return lines
