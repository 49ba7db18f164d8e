"""The kernel dispatch in rlhf_fast/kernels/__init__.py and dispatch.py: backend resolution, the recorded-winner
table behind "auto", and lazy loading of the Triton modules (also inside torch.compile). The module/function
name clash: test_lora_linear.py."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rlhf_fast import kernels
from rlhf_fast.kernels import dispatch, launch


def test_auto_falls_back_to_torch_outside_the_triton_range(monkeypatch):
    """backend="auto" on CUDA takes torch for ranks > 128 and head dims outside [16, 128]."""
    cuda = torch.device("cuda")
    assert kernels.resolve_backend("lora_linear", "auto", cuda, supported=False) == "torch"
    monkeypatch.setattr(kernels, "triton_implemented", lambda name: True)
    assert kernels.resolve_backend("gae", "auto", cuda) == "triton"
    assert kernels.resolve_backend("lora_linear", "auto", cuda, recorded=lambda: "torch") == "torch"
    assert kernels.resolve_backend("lora_linear", "auto", cuda, supported=False, recorded=lambda: "triton") == "torch"
    seen = []
    monkeypatch.setattr(kernels, "resolve_backend", lambda name, b, d, supported=True, recorded=None:
                        seen.append(supported) or "torch")
    kernels.lora_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(129, 8), torch.randn(4, 129), 1.0)
    kernels.masked_attention(*(torch.randn(1, 1, 3, 8) for _ in range(3)))
    kernels.lora_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(128, 8), torch.randn(4, 128), 1.0)
    kernels.masked_attention(*(torch.randn(1, 1, 3, 16) for _ in range(3)))
    assert seen == [False, False, True, True]


def test_first_call_inside_torch_compile_loads_every_kernel_without_a_graph_break():
    """A fresh process whose first kernel lookups are traced by torch.compile: dynamo snapshots the table of
    loaded kernels at its first lookup, so loading them one by one broke the graph at the second kernel
    (seen on an H200: KeyError 'masked_attention' after lora_linear in a compiled GPT-2)."""
    code = textwrap.dedent("""
        import torch
        from rlhf_fast import kernels

        @torch.compile(backend="eager", fullgraph=True)
        def f(x):
            fns = [kernels._triton_fn(name) for name in ("lora_linear", "masked_attention", "gae", "ppo_loss")]
            return x + len([fn for fn in fns if callable(fn)])

        assert int(f(torch.zeros(()))) == 4
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """dispatch.py believes it runs on an sm_90 card with 132 SMs, reading a table in tmp_path."""
    monkeypatch.setattr(launch, "arch", lambda device: 90)
    monkeypatch.setattr(launch, "num_sms", lambda device: 132)
    path = tmp_path / "table.json"
    monkeypatch.setattr(dispatch, "TABLE_PATH", path)
    yield path
    dispatch._table_at.cache_clear()


def _row(kernel, key, winner):
    return dict(kernel=kernel, key=key, winner=winner, ms={"torch": 1.0, "triton": 0.9}, device="fake", source="t")


def test_auto_is_the_library_path_unless_a_record_says_otherwise(fake_gpu):
    cuda = torch.device("cuda")
    key = dispatch.lora_key(cuda, torch.bfloat16, 1600, 4800, 8, 4000)
    assert key == "sm90x132|bfloat16|1600|4800|r8|t4096"
    assert dispatch.lora_key(cuda, torch.bfloat16, 1600, 4800, 9, 4097) == "sm90x132|bfloat16|1600|4800|r16|t8192"
    x = torch.empty(4000, 1600, dtype=torch.bfloat16, device="meta")
    w = torch.empty(4800, 1600, dtype=torch.bfloat16, device="meta")
    x.__class__ = type("FakeCuda", (torch.Tensor,), {"device": property(lambda self: cuda)})  # only .device read
    assert dispatch.lora_backend(x, w, 8) == "torch"  # empty table: cuBLAS-first
    dispatch.write_rows([_row("lora_linear", key, "triton")], fake_gpu)
    assert dispatch.lora_backend(x, w, 8) == "triton"
    assert dispatch.lora_backend(x, w, 64) == "torch"  # another rank bucket: not recorded
    # token count unknown (symbolic under compile): used only when every token bucket agrees
    assert dispatch._winner("lora_linear", dispatch.lora_key(cuda, torch.bfloat16, 1600, 4800, 8, None)) == "triton"
    other = dispatch.lora_key(cuda, torch.bfloat16, 1600, 4800, 8, 16384)
    dispatch.write_rows([_row("lora_linear", key, "triton"), _row("lora_linear", other, "torch")], fake_gpu)
    assert dispatch._winner("lora_linear", dispatch.lora_key(cuda, torch.bfloat16, 1600, 4800, 8, None)) == "torch"
    akey = dispatch.attention_key(cuda, torch.bfloat16, 25, 64, 512, 512, True)
    assert akey == "sm90x132|bfloat16|h25|d64|q512k512|pad"
    dispatch.write_rows([_row("masked_attention", akey, "triton")], fake_gpu)
    assert dispatch._winner("masked_attention", akey) == "triton"
    assert dispatch._winner("masked_attention", akey.replace("|pad", "|nopad")) == "torch"
    assert dispatch._winner("masked_attention", dispatch.attention_key(cuda, torch.bfloat16, 25, 64, None, None,
                                                                       True)) == "triton"
    lines = dispatch.describe_auto(cuda, torch.bfloat16, {"gpt2-xl": (1600, 25)}, tokens=4096)
    assert lines == ["gpt2-xl: lora_linear r8 x 4096 tokens: c_attn torch, c_proj torch, c_fc torch, "
                     "mlp.c_proj torch; attention T=512 padded: triton"]


def test_table_rows_merge_by_key_and_bad_rows_are_refused(fake_gpu):
    a, b = _row("lora_linear", "k1", "torch"), _row("lora_linear", "k2", "triton")
    merged = dispatch.merge_rows([a, b], [_row("lora_linear", "k1", "triton")])
    assert [(r["key"], r["winner"]) for r in merged] == [("k1", "triton"), ("k2", "triton")]
    fake_gpu.write_text(json.dumps({"rows": [_row("lora_linear", "k", "cutlass")]}))
    with pytest.raises(ValueError, match="bad dispatch row"):
        dispatch.load_rows(fake_gpu)


def test_shipped_table_is_valid_and_only_holds_gpu_measurements():
    rows = dispatch.load_rows()
    for r in rows:
        assert r["key"].startswith("sm") and r["ms"] and r["device"] and r["source"], r
        assert r["winner"] == min(r["ms"], key=r["ms"].get), r


def test_lookup_is_constant_under_compile_with_dynamic_token_counts(fake_gpu):
    """The lookup on a (symbolic) token count neither breaks the graph nor specialises on it."""
    from torch._dynamo.testing import CompileCounter

    cuda = torch.device("cuda")
    dispatch.write_rows([_row("lora_linear", dispatch.lora_key(cuda, torch.float32, 5, 6, 4, n), "triton")
                         for n in (256, 1024)], fake_gpu)
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def f(x, w):
        tokens = dispatch._static(x.numel() // w.shape[1])
        pick = dispatch._winner("lora_linear", dispatch.lora_key(cuda, x.dtype, w.shape[1], w.shape[0], 4, tokens))
        return x @ w.t() + (1 if pick == "triton" else 0)

    w = torch.zeros(6, 5)
    assert [float(f(torch.zeros(n, 5), w)[0, 0]) for n in (3, 9, 17)] == [1.0, 1.0, 1.0]
    assert counter.frame_count == 1  # traced once: no recompile per token count
