"""generate(): HF parity, KV-cache correctness, batch invariance, EOS handling, logprobs, seeding,
bad input, on_step streaming. Small fp32 models on CPU. The decode engine and its CUDA graph: test_decode_graph.py."""

import pytest
import torch

from rlhf_fast.generation import (
    EOS_CHECK_EVERY,
    cache_length,
    decode_one_token,
    generate,
    kv_cache_for,
    prefill,
)
from rlhf_fast.model import GPT
from rlhf_fast.model.kv_cache import KVCache

VOCAB = 320  # the tiny preset


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT.from_preset("tiny", attn_backend="torch").eval()


def left_padded(lengths, P, vocab=VOCAB, seed=1):
    """(B, P) ids with garbage (random ids) in the padding, and the left-padding mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), P), generator=g)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, P - n :] = 1
    return ids, mask


def first_eos_structure_ok(tokens_eos, resp_mask, tokens_free, eos, pad):
    """Row by row: the EOS run equals the free run up to and including the first EOS, then only pad."""
    for row in range(tokens_eos.shape[0]):
        free = tokens_free[row].tolist()
        stop = free.index(eos) + 1 if eos in free else len(free)
        n = tokens_eos.shape[1]
        expect = (free[:stop] + [pad] * n)[:n]
        assert tokens_eos[row].tolist() == expect, f"row {row}"
        assert resp_mask[row].tolist() == ([1] * stop + [0] * n)[:n], f"row {row}"


# ----------------------------------------------------------------------------------------------
# Parity with Hugging Face generate


@torch.no_grad()
def test_greedy_matches_hf_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=101,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(str(tmp_path / "hf"), attn_backend="torch").eval()
    ids, mask = left_padded([9, 5, 1], 9, vocab=101)
    N, pad = 14, 100

    def hf_generate(eos):
        # HF derives left-padding position ids from attention_mask itself (cumsum - 1).
        return hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N, pad_token_id=pad,
                           eos_token_id=eos)

    free = generate(ours, ids, mask, max_new_tokens=N, do_sample=False, pad_token_id=pad)
    assert torch.equal(free.sequences, hf_generate(None))
    # An EOS that row 0 emits at step 2: rows stop at different times (or never), HF pads the same way.
    eos = int(free.sequences[0, 9 + 2])
    ours_eos = generate(ours, ids, mask, max_new_tokens=N, do_sample=False, eos_token_id=eos,
                        pad_token_id=pad)
    ref = hf_generate(eos)
    assert ours_eos.sequences.shape == ref.shape
    assert torch.equal(ours_eos.sequences, ref)


# ----------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
@torch.no_grad()
def test_cached_decode_logits_equal_full_recompute(backend):
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend=backend).eval()
    ids, mask = left_padded([7, 3, 1], 7)
    B, P = ids.shape
    cache = KVCache.for_model(model.config, B, 21, torch.float32, "cpu")
    cache.valid.fill_(True)  # stale garbage from an "earlier call" must be cleared by prefill
    for layer in cache.layers:
        layer.k.normal_()
        layer.v.normal_()
    seq, seq_mask = ids, mask
    logits = prefill(model, ids, mask, cache)
    position_ids = mask.sum(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(2)
    for step in range(13):
        full = model(seq, seq_mask)[:, -1]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        token = torch.randint(0, VOCAB, (B, 1), generator=g)
        logits = decode_one_token(model, cache, token, position_ids, torch.tensor([P + step]))
        position_ids = position_ids + 1
        seq = torch.cat([seq, token], dim=1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(token)], dim=1)
    assert cache.valid[:, : P + 13].eq(seq_mask.bool()).all() and not cache.valid[:, P + 13 :].any()


def test_cache_buckets_and_reuse(tiny):
    assert cache_length(1, 1024) == 128 and cache_length(128, 1024) == 128 and cache_length(129, 1024) == 256
    assert cache_length(1000, 1024) == 1024 and cache_length(70, 100) == 100
    a = kv_cache_for(tiny, 3, 128, torch.float32, "cpu")
    assert kv_cache_for(tiny, 3, 128, torch.float32, "cpu") is a
    assert kv_cache_for(tiny, 4, 128, torch.float32, "cpu") is not a
    assert a.layers[0].k.shape == (3, 2, 128, 16) and a.valid.shape == (3, 128)
    with pytest.raises(ValueError, match="n_positions"):
        KVCache.for_model(tiny.config, 3, 129, torch.float32, "cpu")


# ----------------------------------------------------------------------------------------------
# Batching, EOS, logprobs, sampling


@torch.no_grad()
def test_row_alone_equals_row_in_padded_batch(tiny):
    ids, mask = left_padded([11, 4, 1], 11)
    batched = generate(tiny, ids, mask, max_new_tokens=12, do_sample=False)
    for i in range(3):
        real = mask[i].bool()
        alone = generate(tiny, ids[i : i + 1, real], None, max_new_tokens=12, do_sample=False)
        assert torch.equal(batched.sequences[i, 11:], alone.sequences[0, int(real.sum()) :]), f"row {i}"


@torch.no_grad()
def test_eos_then_only_pad_and_masks(tiny):
    ids, mask = left_padded([6, 2, 5, 3], 6, seed=3)
    N, pad = 20, 300
    free = generate(tiny, ids, mask, max_new_tokens=N, do_sample=False, pad_token_id=pad)
    eos = int(free.sequences[1, 6 + 4])  # row 1 ends at step 4 at the latest
    out = generate(tiny, ids, mask, max_new_tokens=N, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    resp = out.sequences[:, 6:]
    first_eos_structure_ok(resp, out.response_mask, free.sequences[:, 6:], eos, pad)
    assert torch.equal(out.attention_mask, torch.cat([mask, out.response_mask], dim=1))
    assert out.sequences.shape[1] == 6 + out.response_mask.sum(dim=1).max()
    assert (out.response_mask[:, 0] == 1).all()


@torch.no_grad()
def test_stops_early_once_every_row_finished():
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="torch").eval()
    eos = 5
    # Final hidden state = wte[eos] for every position: EOS is every row's greedy choice at step 0.
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(10 * model.transformer.wte.weight[eos])
    calls = []
    model.transformer.ln_f.register_forward_hook(lambda *_: calls.append(1))
    ids, mask = left_padded([4, 2], 4)
    out = generate(model, ids, mask, max_new_tokens=40, do_sample=False, eos_token_id=eos)
    assert out.sequences.shape == (2, 5) and (out.sequences[:, 4] == eos).all()
    assert out.response_mask.tolist() == [[1], [1]]
    # prefill + decode steps until the first "all finished?" check, not 40 forwards.
    assert len(calls) == EOS_CHECK_EVERY


@torch.no_grad()
def test_logprobs_equal_full_forward(tiny):
    ids, mask = left_padded([8, 3, 6], 8, seed=4)
    kw = dict(max_new_tokens=15, do_sample=True, temperature=0.7, top_k=40, return_logprobs=True)
    free = generate(tiny, ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    eos = int(free.sequences[2, 8 + 3])  # same seed -> same draws: row 2 now stops by step 3
    out = generate(tiny, ids, mask, eos_token_id=eos, generator=torch.Generator().manual_seed(5), **kw)
    resp_mask = out.response_mask.bool()
    assert not resp_mask.all()
    logits = tiny(out.sequences, out.attention_mask)  # (B, P+N, V)
    N = out.response_mask.shape[1]
    # log-probs of the distribution sampled from: logits / temperature (top-k is not part of it)
    ref = torch.log_softmax(logits[:, 7 : 7 + N] / 0.7, dim=-1).gather(-1, out.sequences[:, 8:, None])[..., 0]
    torch.testing.assert_close(out.logprobs[resp_mask], ref[resp_mask], atol=1e-5, rtol=1e-5)
    assert (out.logprobs[~resp_mask] == 0).all()
    assert free.logprobs is not None and generate(tiny, ids, mask, max_new_tokens=3).logprobs is None


@torch.no_grad()
def test_seeded_sampling_reproducible_and_top_k_1_is_greedy(tiny):
    ids, mask = left_padded([5, 2], 5)
    run = lambda seed, **kw: generate(tiny, ids, mask, max_new_tokens=16,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed), **kw).sequences
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    greedy = generate(tiny, ids, mask, max_new_tokens=16, do_sample=False).sequences
    assert torch.equal(run(9, top_k=1), greedy)
    assert torch.equal(run(9, top_p=1e-6), greedy)
    assert not torch.equal(run(9, temperature=2.0), greedy)


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(max_new_tokens=124), "exceeds the model's n_positions=128"),
        (dict(max_new_tokens=4, right_pad=True), "row 1 has padding after a real token"),
        (dict(max_new_tokens=4, mask_shape=(2, 4)), "attention_mask has shape"),
        (dict(max_new_tokens=4, empty_row=True), "at least one real token"),
        (dict(max_new_tokens=4, eos_token_id=320), "eos_token_id must be an int in"),
        (dict(max_new_tokens=4, temperature=0.0), "temperature must be > 0"),
        (dict(max_new_tokens=4, top_p=0.0), "top_p must be in"),
        (dict(max_new_tokens=4, top_k=-1), "top_k must be an int >= 0"),
        (dict(max_new_tokens=4, float_ids=True), "input_ids must be a"),
    ],
)
def test_bad_input(tiny, kwargs, match):
    ids, mask = left_padded([5, 2], 5)
    if kwargs.pop("right_pad", False):
        mask[1] = mask[1].flip(0)
    if kwargs.pop("empty_row", False):
        mask[1] = 0
    if "mask_shape" in kwargs:
        mask = torch.ones(kwargs.pop("mask_shape"), dtype=torch.long)
    if kwargs.pop("float_ids", False):
        ids = ids.float()
    with pytest.raises(ValueError, match=match):
        generate(tiny, ids, mask, **kwargs)


# ----------------------------------------------------------------------------------------------
# on_step: per-step tokens for streaming, and stopping early


@torch.no_grad()
def test_on_step_sees_every_token_and_can_stop_early(tiny):
    ids, mask = left_padded([6, 2, 5, 3], 6, seed=3)
    N, pad = 20, 300
    free = generate(tiny, ids, mask, max_new_tokens=N, do_sample=False, pad_token_id=pad)
    eos = int(free.sequences[1, 6 + 4])  # row 1 ends by step 4; others later or never
    seen, flags = [], []

    def record(t, token, finished):
        assert t == len(seen) and token.shape == finished.shape == (4,)
        seen.append(token.clone())
        flags.append(finished.clone())

    out = generate(tiny, ids, mask, max_new_tokens=N, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                   on_step=record)
    resp = out.sequences[:, 6:]
    assert len(seen) == resp.shape[1]  # the step that finishes the last row is reported too
    assert torch.equal(torch.stack(seen, dim=1), resp)
    assert torch.equal(torch.stack(flags, dim=1), (resp == eos).long().cummax(dim=1).values.bool())
    # Same call without the hook: same tokens (it only observes).
    plain = generate(tiny, ids, mask, max_new_tokens=N, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(plain.sequences, out.sequences)

    # Returning True at step 4 stops after it: 5 columns, the free run's prefix, a full response mask.
    calls = []
    cut = generate(tiny, ids, mask, max_new_tokens=N, do_sample=False, pad_token_id=pad,
                   on_step=lambda t, token, finished: calls.append(t) or t == 4)
    assert calls == [0, 1, 2, 3, 4]
    assert torch.equal(cut.sequences, free.sequences[:, : 6 + 5])
    assert cut.response_mask.shape == (4, 5) and bool(cut.response_mask.all())


@torch.no_grad()
def test_on_step_called_for_the_step_after_which_every_row_has_finished():
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="torch").eval()
    eos = 5
    with torch.no_grad():  # EOS is every row's greedy choice at every step (as in the early-stop test)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(10 * model.transformer.wte.weight[eos])
    ids, mask = left_padded([4, 2], 4)
    steps = []
    generate(model, ids, mask, max_new_tokens=40, do_sample=False, eos_token_id=eos,
             on_step=lambda t, token, finished: steps.append((t, bool(finished.all()))))
    # generation ends at the first "all finished?" check; the callback still saw that step
    assert steps == [(t, True) for t in range(EOS_CHECK_EVERY)]
