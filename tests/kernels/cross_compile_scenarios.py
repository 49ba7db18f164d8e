"""The launches the cross-compile tier (cross_compile.py) captures: each scenario runs kernel launchers on empty
CPU tensors of one dtype, at GPT-2 shapes (`scenarios`: compiled for every target) and at GPT-2 XL token counts
(`xl_scenarios`: the streaming kernels' grids, checked against a wave of the target's SMs)."""

from __future__ import annotations

XL_TOKENS = (4096, 16384)  # 4 or 16 sequences of 1024 tokens


def scenarios(dtype_name: str):
    """(name, fn) pairs; each fn runs launchers on CPU tensors of this dtype (under `capturing`)."""
    import torch

    from rlhf_fast.kernels import attention, logprobs, lora, ppo

    dtype = getattr(torch, dtype_name)

    def rand(*shape, grad=False, dt=dtype):  # values never matter: launches are recorded, not run
        return torch.empty(*shape, dtype=dt).requires_grad_(grad)

    def attn(D, H, causal, masked):
        def run():
            B, T = 2, 97
            q, k, v = (rand(B, H, T, D, grad=True) for _ in range(3))
            mask = torch.ones(B, T, dtype=torch.bool)
            mask[0, :13] = False
            o = attention.masked_attention(q, k, v, mask if masked else None, causal)
            o.backward(torch.empty_like(o))  # a real upstream gradient (not .sum()'s stride-0 one)
            with torch.no_grad():  # decode: one query over a 384-slot KV cache, split and direct
                for b, h in ((1, H), (64, H)):
                    kc, vc = rand(b, h, 384, D), rand(b, h, 384, D)
                    cmask = torch.ones(b, 384, dtype=torch.bool)
                    attention.masked_attention(rand(b, h, 1, D), kc, vc, cmask if masked else None, causal)

        return run

    def lora_linear(C, out, rank, frozen_base=True):
        def run():
            x = rand(3, 37, C, grad=True)
            w = rand(out, C, grad=not frozen_base)
            bias = rand(out)
            a, b = rand(rank, C, grad=True), rand(out, rank, grad=True)
            y = lora.lora_linear(x, w, bias, a, b, 2.0)
            y.backward(torch.empty_like(y))

        return run

    def linear_logprobs(C, train_head):
        def run():
            h, w = rand(37, C, grad=True), rand(50257, C, grad=train_head)
            out = logprobs.linear_logprobs(h, w, torch.zeros(37, dtype=torch.long), 0.7, with_entropy=True)
            (out.logprobs + out.entropy).backward(torch.empty_like(out.logprobs))

        return run

    out = []
    for D, H in ((64, 12), (128, 8)):
        out.append((f"attention D={D} causal+mask", attn(D, H, True, True)))
    out.append(("attention D=64 causal, no mask", attn(64, 12, True, False)))
    for rank in (1, 8, 64, 128):  # R_PAD 16, 16, 64, 128; rank 1 is its own specialisation
        out.append((f"lora_linear C=768->2304 r={rank}", lora_linear(768, 2304, rank)))
    out.append(("lora_linear C=1600->6400 r=16, trainable W", lora_linear(1600, 6400, 16, frozen_base=False)))
    out.append(("linear_logprobs C=768 V=50257", linear_logprobs(768, False)))
    out.append(("linear_logprobs C=1600 V=50257, trainable head", linear_logprobs(1600, True)))
    if dtype == torch.float32:  # the RL maths is fp32 whatever the training precision

        def rl(T):
            def run():
                B = 64
                f = lambda grad=False: rand(B, T, grad=grad, dt=torch.float32)  # noqa: E731
                mask = torch.ones(B, T, dtype=torch.bool)
                ppo.gae(f(), f(), mask, 0.99, 0.95)
                for ref in (None, f()):
                    res = ppo.ppo_loss(f(True), f(), f(), f(True), f(), f(), mask, clip_eps=0.2,
                                       value_clip_eps=0.2, vf_coef=0.5, ref_logprobs=ref, kl_coef=0.1)
                    res.loss.backward()

            return run

        for T in (97, 512, 2048):  # gae's time tile: 128 / 512 / 1024 (+ chunks)
            out.append((f"gae+ppo_loss B=64 T={T}", rl(T)))
    # The XL LoRA launches too: the projection's row tile follows the token count (16 / 32 / 64 rows there)
    out += [s for s in xl_scenarios(dtype_name) if s[0].startswith("lora_linear")]
    return out


def xl_scenarios(dtype_name: str):
    """(name, fn) pairs at GPT-2 XL scale (C = 1600, 25 heads of 64) for each of XL_TOKENS: the launches
    of the STREAMING kernels, whose grids grow with the token count (checked, not compiled)."""
    import torch

    from rlhf_fast.kernels import attention, lora

    dtype = getattr(torch, dtype_name)
    C, H, D, T = 1600, 25, 64, 1024

    def rand(*shape, grad=False):  # never read: launches are recorded, not run
        return torch.empty(*shape, dtype=dtype).requires_grad_(grad)

    def qkv_projection(B):  # LoRA rank 16 on the fused QKV linear, forward and backward
        def run():
            x, a, b = rand(B, T, C, grad=True), rand(16, C, grad=True), rand(3 * C, 16, grad=True)
            y = lora.lora_linear(x, rand(3 * C, C), rand(3 * C), a, b, 2.0)
            y.backward(torch.empty_like(y))

        return run

    def decode(B):  # one new token per sequence over a full 1024-slot KV cache
        def run():
            with torch.no_grad():
                k, v = rand(B, H, T, D), rand(B, H, T, D)
                attention.masked_attention(rand(B, H, 1, D), k, v, torch.ones(B, T, dtype=torch.bool))

        return run

    out = []
    for tokens in XL_TOKENS:
        out.append((f"lora_linear C={C}->{3 * C} r=16, {tokens} tokens", qkv_projection(tokens // T)))
        out.append((f"decode B={tokens // T} H={H} D={D} over {T} cached tokens", decode(tokens // T)))
    return out


