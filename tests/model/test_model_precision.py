"""The model under autocast (docs/precision.md): fp32 master weights or low-precision weights, both kernel
backends, the fp32 layer_norm output CUDA autocast produces, and KV-cached generation."""

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast.generation import generate
from rlhf_fast.model import GPT, ScalarHead, add_lora

# CPU autocast stands in for CUDA's: bf16 with the torch backends, fp16 with the Triton interpreter.
BACKENDS = [("torch", "sdpa", torch.bfloat16), ("triton", "triton", torch.float16)]


def _model(kernel_backend, attn_backend, weights):
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", kernel_backend=kernel_backend, attn_backend=attn_backend)
    add_lora(model, "policy", rank=4)
    model.set_adapter("policy")
    return model.to(weights)


def _batch():
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return ids, mask


def _fp32_layer_norm(module, args, output):
    return output.float()  # what CUDA autocast's layer_norm returns, whatever its input dtype


@pytest.mark.parametrize("kernel_backend,attn_backend,amp", BACKENDS)
@pytest.mark.parametrize("weights", ["fp32", "amp"])
@pytest.mark.parametrize("cuda_layer_norm", [False, True])
def test_forward_backward_under_autocast(kernel_backend, attn_backend, amp, weights, cuda_layer_norm):
    if kernel_backend == "triton" and torch.cuda.is_available():
        pytest.skip("interpreter case (CPU tensors)")
    model = _model(kernel_backend, attn_backend, torch.float32 if weights == "fp32" else amp)
    if cuda_layer_norm:
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.register_forward_hook(_fp32_layer_norm)
    head = ScalarHead(model.config.n_embd)
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=amp):
        hidden = model.hidden_states(ids, mask)
        logits = model.lm_head(hidden)
        values = head(hidden)
    assert values.dtype == torch.float32
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()) + values.square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if ".lora_" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)


def test_value_head_scores_are_fp32_under_autocast():
    head = ScalarHead(16).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = head(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert scores.dtype == torch.float32


@pytest.mark.parametrize("kernel_backend,attn_backend,amp", BACKENDS)
def test_generate_under_autocast_with_fp32_weights(kernel_backend, attn_backend, amp):
    """fp32 master weights under autocast: the KV cache stores k, v in the autocast dtype."""
    if kernel_backend == "triton" and torch.cuda.is_available():
        pytest.skip("interpreter case (CPU tensors)")
    model = _model(kernel_backend, attn_backend, torch.float32)
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=amp):
        out = generate(model, ids, mask, max_new_tokens=5, do_sample=False, return_logprobs=True, compile=False)
    assert out.response_mask.shape == (2, 5) and out.logprobs.dtype == torch.float32
    assert torch.isfinite(out.logprobs).all()
