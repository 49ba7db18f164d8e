"""The decode engine (decode_graph.py): its static-buffer step against per-step references, the graph code path
on CPU (capture replaced by a fake whose replay runs the captured step), recapture when the model changes,
the generator hand-back, and the fallbacks (compile or capture failure, hooks, RLHF_FAST_NO_CUDA_GRAPH), each
warning once. GPU tests: the real CUDA graph (with and without inductor) against eager, and the generation vs
training log-prob gap through it."""

import warnings

import pytest
import torch

from rlhf_fast.generation import (
    DecodeSpec,
    SamplingConfig,
    cache_length,
    decode_engine_for,
    decode_graph,
    decode_one_token,
    generate,
    kv_cache_for,
    prefill,
    sample_next_token,
    token_logprobs,
)
from rlhf_fast.model import GPT, add_lora
from rlhf_fast.model.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 320  # the tiny preset
SAMPLED = dict(do_sample=True, temperature=0.8, top_k=50)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT.from_preset("tiny", attn_backend="torch").eval()


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts with no failure reason warned about yet."""
    monkeypatch.setattr(decode_graph, "_WARNED", set())


def left_padded(lengths, P, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(lengths), P), generator=g)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, P - n:] = 1
    return ids.to(device), mask.to(device)


class FakeGraph:
    """What the real capture returns, minus CUDA: replay runs the captured step (eagerly)."""

    def __init__(self, step):
        self.step, self.replays = step, 0

    def replay(self):
        self.replays += 1
        self.step()


@pytest.fixture
def fake_capture(monkeypatch):
    """cuda_graph=True on CPU runs the graph code path: warm-up steps, the engine's own registered
    generator, replay per step. Returns the list of (graph, generator) captured."""
    captured = []

    def capture(step, device, generator):
        for _ in range(decode_graph.WARMUP_STEPS):  # warm-up scribbles on the cache, as the real one does
            step()
        captured.append((FakeGraph(step), generator))
        return captured[-1][0]

    monkeypatch.setattr(decode_graph, "capture_graph", capture)
    return captured


def reference_loop(model, ids, mask, N, sampling, eos, pad, generator=None):
    """The decode loop written out step by step, fresh tensors each step: (tokens, response_mask, logprobs)."""
    B, P = ids.shape
    cache = KVCache.for_model(model.config, B, cache_length(P + N, model.config.n_positions), torch.float32,
                              ids.device)
    logits = prefill(model, ids, mask, cache)
    position_ids = mask.sum(dim=1, keepdim=True)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    tokens, response_mask, logprobs = [], [], []
    for t in range(N):
        token = sample_next_token(logits, sampling, generator).masked_fill(finished, pad)
        tokens.append(token)
        response_mask.append((~finished).long())
        logprobs.append(token_logprobs(logits, token, sampling.temperature).masked_fill(finished, 0.0))
        if eos is not None:
            finished = finished | (token == eos)
        pos = torch.tensor([P + t], device=ids.device)
        logits = decode_one_token(model, cache, token[:, None], position_ids + t, pos)
    return torch.stack(tokens, 1), torch.stack(response_mask, 1), torch.stack(logprobs, 1)


def no_cache_greedy(model, ids, mask, N, eos, pad):
    """Greedy by full forwards over the growing sequence (no KV cache at all)."""
    seq, seq_mask = ids, mask
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(N):
        token = model(seq, seq_mask)[:, -1].argmax(dim=-1).masked_fill(finished, pad)
        seq, seq_mask = torch.cat([seq, token[:, None]], 1), torch.cat([seq_mask, (~finished).long()[:, None]], 1)
        finished |= token == eos
    return seq[:, ids.shape[1]:], seq_mask[:, ids.shape[1]:]


def assert_same_as_reference(out, ref, P):
    tokens, response_mask, logprobs = ref
    n = out.response_mask.shape[1]
    assert torch.equal(out.sequences[:, P:], tokens[:, :n])
    assert torch.equal(out.response_mask, response_mask[:, :n])
    assert not response_mask[:, n:].any()  # the trimmed columns held nothing
    if out.logprobs is not None:
        assert torch.equal(out.logprobs, logprobs[:, :n])


# ----------------------------------------------------------------------------------------------
# The step against references (eager, and the graph code path with a fake capture)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-path"])
@torch.no_grad()
def test_greedy_equals_no_cache_full_forward(tiny, graph, request):
    if graph:
        request.getfixturevalue("fake_capture")
    ids, mask = left_padded([6, 2, 5, 3], 6, seed=3)
    free, _ = no_cache_greedy(tiny, ids, mask, 14, eos=-1, pad=300)
    eos = int(free[1, 4])  # rows reach it at different steps (row 1 by step 4), some maybe never
    want, want_mask = no_cache_greedy(tiny, ids, mask, 14, eos=eos, pad=300)
    out = generate(tiny, ids, mask, max_new_tokens=14, do_sample=False, eos_token_id=eos, pad_token_id=300,
                   cuda_graph=graph)
    n = out.response_mask.shape[1]
    assert torch.equal(out.sequences[:, 6:], want[:, :n]) and torch.equal(out.response_mask, want_mask[:, :n])
    assert 0 < want_mask[1].sum() < want_mask.sum(dim=1).max()  # rows did finish at different steps
    assert not want_mask[:, n:].any()


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-path"])
@torch.no_grad()
def test_sampled_equals_per_step_reference_loop(tiny, graph, request):
    if graph:
        request.getfixturevalue("fake_capture")
    ids, mask = left_padded([7, 3, 1, 5], 7, seed=4)
    sampling = SamplingConfig(**SAMPLED)
    tokens, _, _ = reference_loop(tiny, ids, mask, 12, sampling, None, 300, torch.Generator().manual_seed(5))
    eos = int(tokens[0, 3])  # row 0 stops at step 3 at the latest
    ref = reference_loop(tiny, ids, mask, 12, sampling, eos, 300, torch.Generator().manual_seed(5))
    runs = [generate(tiny, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=300, return_logprobs=True,
                     generator=torch.Generator().manual_seed(5), cuda_graph=graph, **SAMPLED) for _ in range(2)]
    for out in runs:
        assert_same_as_reference(out, ref, 7)
        assert (out.logprobs[out.response_mask == 0] == 0).all() and (out.response_mask == 0).any()
    assert torch.equal(runs[0].sequences, runs[1].sequences)


@torch.no_grad()
def test_graph_path_replays_hands_the_generator_back_and_recaptures_on_change(fake_capture):
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="torch").eval()
    add_lora(model, "policy", rank=4)
    ids, mask = left_padded([5, 2], 5)
    kw = dict(max_new_tokens=9, **SAMPLED)
    g_eager, g_graph = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    eager = generate(model, ids, mask, generator=g_eager, cuda_graph=False, **kw)
    graphed = generate(model, ids, mask, generator=g_graph, cuda_graph=True, **kw)
    assert torch.equal(eager.sequences, graphed.sequences)
    assert torch.equal(g_eager.get_state(), g_graph.get_state())  # left where eager leaves it
    (graph, own), = fake_capture
    assert graph.replays == 8 and own is not g_graph  # N - 1 steps; the engine samples with its own generator
    # unseeded: the global generator is the one copied in and out
    torch.manual_seed(11)
    a = generate(model, ids, mask, cuda_graph=True, **kw).sequences
    after = torch.random.get_rng_state()
    torch.manual_seed(11)
    assert torch.equal(generate(model, ids, mask, cuda_graph=False, **kw).sequences, a)
    assert torch.equal(torch.random.get_rng_state(), after)
    assert len(fake_capture) == 1  # same model state, same engine: no recapture
    # A different Python-level state: adapters off, then trained adapter weights moved to new storage.
    with model.disable_adapters():
        want = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), cuda_graph=False, **kw)
        got = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), cuda_graph=True, **kw)
    assert torch.equal(want.sequences, got.sequences) and len(fake_capture) == 2
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn_like(p)  # a new tensor: the captured pointer would be stale
    want = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), cuda_graph=False, **kw)
    got = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), cuda_graph=True, **kw)
    assert torch.equal(want.sequences, got.sequences) and len(fake_capture) == 3
    assert not torch.equal(want.sequences, eager.sequences)


@torch.no_grad()
def test_on_step_streams_the_graph_path(tiny, fake_capture):
    ids, mask = left_padded([6, 2, 5], 6, seed=3)
    seen = []
    out = generate(tiny, ids, mask, max_new_tokens=10, do_sample=False, cuda_graph=True,
                   on_step=lambda t, token, finished: seen.append(token) or t == 6)
    assert torch.equal(torch.stack(seen, 1), out.sequences[:, 6:]) and out.sequences.shape[1] == 6 + 7
    # the callback got copies: later steps did not overwrite what it kept
    assert torch.equal(out.sequences[:, 6:], generate(tiny, ids, mask, max_new_tokens=7, do_sample=False,
                                                      cuda_graph=False).sequences[:, 6:])


# ----------------------------------------------------------------------------------------------
# Fallbacks: one warning per reason, the same tokens


@torch.no_grad()
def test_capture_failure_warns_once_and_decodes_eagerly(tiny, monkeypatch):
    calls = []

    def broken(step, device, generator):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(decode_graph, "capture_graph", broken)
    ids, mask = left_padded([5, 2, 4], 5)
    kw = dict(max_new_tokens=8, eos_token_id=7, return_logprobs=True, **SAMPLED)
    want = generate(tiny, ids, mask, generator=torch.Generator().manual_seed(2), cuda_graph=False, **kw)
    with pytest.warns(RuntimeWarning, match="capture of the decode step failed") as record:
        got = generate(tiny, ids, mask, generator=torch.Generator().manual_seed(2), cuda_graph=True, **kw)
        again = generate(tiny, ids, mask, generator=torch.Generator().manual_seed(2), cuda_graph=True, **kw)
        other = generate(tiny, ids[:2], mask[:2], max_new_tokens=3, cuda_graph=True)  # another engine
    assert len(record) == 1 and "RuntimeError: operation not permitted when stream is capturing more detail" in str(
        record[0].message)
    assert calls == [1, 1]  # the failed engine does not retry; a new engine tries once
    for out in (got, again):
        assert torch.equal(out.sequences, want.sequences) and torch.equal(out.logprobs, want.logprobs)
    assert other.sequences.shape == (2, 8)


@torch.no_grad()
def test_compile_failure_warns_once_and_decodes_eagerly(tiny, monkeypatch, fake_capture):
    def broken_compile():
        def step(*args):
            raise torch._dynamo.exc.Unsupported("cannot trace this")
        return step

    monkeypatch.setattr(decode_graph, "_compiled_decode", broken_compile)
    ids, mask = left_padded([5, 2, 4], 5)
    want = generate(tiny, ids, mask, max_new_tokens=8, do_sample=False)
    with pytest.warns(RuntimeWarning, match="torch.compile of the decode step failed") as record:
        for graph in (False, True, True):  # eager steps, then warm-up in the (fake) capture
            out = generate(tiny, ids, mask, max_new_tokens=8, do_sample=False, compile=True, cuda_graph=graph)
            assert torch.equal(out.sequences, want.sequences)
    assert len(record) == 1 and len(fake_capture) == 1


@torch.no_grad()
def test_env_var_and_hooks_keep_decode_eager(tiny, fake_capture, monkeypatch):
    ids, mask = left_padded([5, 2], 5)
    want = generate(tiny, ids, mask, max_new_tokens=6, do_sample=False).sequences
    monkeypatch.setenv("RLHF_FAST_NO_CUDA_GRAPH", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(generate(tiny, ids, mask, max_new_tokens=6, do_sample=False, cuda_graph=True).sequences,
                           want)
    monkeypatch.delenv("RLHF_FAST_NO_CUDA_GRAPH")
    calls = []
    handle = tiny.transformer.ln_f.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.warns(RuntimeWarning, match="forward hooks") as record:
            for _ in range(2):
                out = generate(tiny, ids, mask, max_new_tokens=6, do_sample=False, cuda_graph=True)
                assert torch.equal(out.sequences, want)
        assert len(record) == 1 and len(calls) == 2 * 6  # the hook ran on every forward
    finally:
        handle.remove()
    assert not fake_capture


def test_cuda_graph_default_and_env(monkeypatch):
    monkeypatch.delenv("RLHF_FAST_NO_CUDA_GRAPH", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert decode_graph.graph_wanted(cuda, None) and not decode_graph.graph_wanted(cpu, None)
    assert decode_graph.graph_wanted(cpu, True) and not decode_graph.graph_wanted(cuda, False)
    monkeypatch.setenv("RLHF_FAST_NO_CUDA_GRAPH", "0")
    assert decode_graph.graph_wanted(cuda, None)
    monkeypatch.setenv("RLHF_FAST_NO_CUDA_GRAPH", "1")
    assert not decode_graph.graph_wanted(cuda, None) and not decode_graph.graph_wanted(cuda, True)


@torch.no_grad()
def test_engines_are_kept_per_cache_and_spec(tiny):
    cache = kv_cache_for(tiny, 2, 128, torch.float32, "cpu")
    greedy = DecodeSpec(SamplingConfig(do_sample=False), eos_token_id=3, pad_token_id=0)
    engine = decode_engine_for(tiny, cache, greedy)
    assert decode_engine_for(tiny, cache, DecodeSpec(SamplingConfig(do_sample=False), 3, 0)) is engine
    assert decode_engine_for(tiny, cache, DecodeSpec(SamplingConfig(), 3, 0)) is not engine
    assert engine.tokens.shape == engine.response_mask.shape == (2, 128) and engine.logprobs is None


@torch.no_grad()
def test_compile_true_on_cpu_equals_eager(tiny):
    """Inductor on the model step (CPU: no graph around it) gives eager's tokens."""
    torch._dynamo.reset()
    try:
        ids, mask = left_padded([7, 3, 1], 7)
        kw = dict(max_new_tokens=6, return_logprobs=True, **SAMPLED)
        eager = generate(tiny, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to eager
            compiled = generate(tiny, ids, mask, generator=torch.Generator().manual_seed(1), compile=True, **kw)
        assert torch.equal(compiled.sequences, eager.sequences)
        torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# GPU: the real CUDA graph


def _cuda_model(lora=True):
    torch.manual_seed(0)
    model = GPT.from_preset("tiny").cuda().eval()  # default backends: the Triton kernels on CUDA
    if lora:
        add_lora(model, "policy", rank=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)  # a live adapter: the LoRA kernels are in the graph
    return model


def _engine_graphed(model, ids, N, **spec_kw) -> bool:
    B, P = ids.shape
    cache = kv_cache_for(model, B, cache_length(P + N, model.config.n_positions), torch.float32, ids.device)
    return decode_engine_for(model, cache, DecodeSpec(**spec_kw)).graphed


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "graph+inductor"])
@torch.no_grad()
def test_cuda_graph_equals_eager(compile):
    torch._dynamo.reset()
    try:
        model = _cuda_model()
        ids, mask = left_padded([9, 4, 1, 7, 2], 9, device="cuda")
        for sampling in (dict(do_sample=False), dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.9)):
            kw = dict(max_new_tokens=24, eos_token_id=5, pad_token_id=300, return_logprobs=True, **sampling)
            g_eager = torch.Generator("cuda").manual_seed(7)
            eager = generate(model, ids, mask, generator=g_eager, cuda_graph=False, **kw)
            for _ in range(2):  # the first call captures, the second replays the same graph
                g_graph = torch.Generator("cuda").manual_seed(7)
                graphed = generate(model, ids, mask, generator=g_graph, cuda_graph=True, compile=compile, **kw)
                assert torch.equal(graphed.sequences, eager.sequences), sampling
                assert torch.equal(graphed.response_mask, eager.response_mask)
                torch.testing.assert_close(graphed.logprobs, eager.logprobs, atol=1e-5, rtol=1e-5)
                assert torch.equal(g_graph.get_state(), g_eager.get_state())  # the generator advanced as eager's
            assert _engine_graphed(model, ids, 24, sampling=SamplingConfig(**sampling), eos_token_id=5,
                                   pad_token_id=300, return_logprobs=True)
        assert not decode_graph._WARNED  # nothing fell back
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_streams_and_stops_like_eager():
    model = _cuda_model()
    ids, mask = left_padded([7, 3, 1], 7, device="cuda")
    eager = generate(model, ids, mask, max_new_tokens=12, do_sample=False, cuda_graph=False)
    seen = []
    graphed = generate(model, ids, mask, max_new_tokens=12, do_sample=False, cuda_graph=True,
                       on_step=lambda t, token, finished: seen.append(token.tolist()) or t == 8)
    assert torch.equal(graphed.sequences, eager.sequences[:, :7 + 9])
    assert torch.tensor(seen, device="cuda").T.equal(graphed.sequences[:, 7:])
    assert not decode_graph._WARNED


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_generation_logprobs_match_training_forward():
    """Mirrors tests/trainers/test_experience.py's gap check, on the CUDA graph: generation-time log-probs
    (policy adapter active) against the training-time full forward."""
    from rlhf_fast.trainers.rollout import action_logprobs

    model = _cuda_model()
    ids, mask = left_padded([11, 6, 2, 9], 11, device="cuda")
    out = generate(model, ids, mask, max_new_tokens=20, temperature=0.9, eos_token_id=101, return_logprobs=True,
                   generator=torch.Generator("cuda").manual_seed(3), cuda_graph=True)
    P = ids.shape[1]
    train = action_logprobs(model, out.sequences, out.attention_mask, first_action=P - 1, temperature=0.9)[:, P - 1:]
    m = out.response_mask.bool()
    gap = (out.logprobs - train).abs()[m]
    assert gap.max() < 1e-4 and gap.mean() < 1e-5
    assert not decode_graph._WARNED
