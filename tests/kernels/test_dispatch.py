"""The kernel dispatch in rlhf_fast/kernels/__init__.py: backend resolution and lazy loading of the
Triton modules (also inside torch.compile). The module/function name clash: test_lora_linear.py."""

import os
import subprocess
import sys
import textwrap

import torch

from rlhf_fast import kernels


def test_auto_falls_back_to_torch_outside_the_triton_range(monkeypatch):
    """backend="auto" on CUDA takes torch for ranks > 128 and head dims outside [16, 128]."""
    cuda = torch.device("cuda")
    assert kernels.resolve_backend("lora_linear", "auto", cuda, supported=False) == "torch"
    monkeypatch.setattr(kernels, "triton_implemented", lambda name: True)
    assert kernels.resolve_backend("lora_linear", "auto", cuda) == "triton"
    seen = []
    monkeypatch.setattr(kernels, "resolve_backend", lambda name, b, d, supported=True: seen.append(supported)
                        or "torch")
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
