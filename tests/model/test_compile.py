"""Regional compilation (`compile_model`): the same numbers as eager, one graph for every block and every
length, KV-cache calls left eager, and the compile cache's load/save refusing what it cannot trust."""

import contextlib
import copy
import json
import warnings

import pytest
import torch

from rlhf_fast.generation import generate
from rlhf_fast.model import GPT, add_lora, compile_model, load_compile_cache, region_graphs, save_compile_cache
from rlhf_fast.model import compile as compile_mod
from rlhf_fast.model.compile import CompileOptions, uncompile_model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # graphs of other tests do not count here
    yield
    torch._dynamo.reset()


def lora_model(grad_checkpoint=False):
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="sdpa", kernel_backend="torch", grad_checkpoint=grad_checkpoint)
    add_lora(model, "policy", rank=4)
    add_lora(model, "value", rank=4)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    for n, p in model.named_parameters():  # nonzero B: the adapters change the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def batch(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, : T // 3] = 0  # left padding
    ids[0, : T // 3] = 7  # garbage under the padding
    return ids, mask


def loss_and_grads(model, ids, mask, adapter="policy"):
    model.set_adapter(adapter)
    w = torch.linspace(-1, 2, model.config.n_embd)  # uneven upstream gradient
    loss = (model.hidden_states(ids, mask) * w)[mask.bool()].sum()
    params = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(f".{adapter}")]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_regional_matches_eager_and_reuses_one_graph_across_lengths(grad_checkpoint):
    model = lora_model(grad_checkpoint)
    ids, mask = batch(3, 17)
    want = loss_and_grads(model, ids, mask)
    compile_model(model, backend="aot_eager")
    assert all(b.compile_options == CompileOptions("aot_eager") for b in model.transformer.h)
    got = loss_and_grads(model, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    graphs = region_graphs()
    assert graphs == 1  # both blocks, one variant: the first block's input asks for grad like the others'
    for B, T in ((3, 29), (2, 11), (5, 40)):  # new lengths and batch sizes: dynamic from the first compile
        ids, mask = batch(B, T, seed=T)
        loss_and_grads(model, ids, mask)
    assert region_graphs() == graphs


def test_adapters_are_inputs_one_graph_per_grad_mode_and_kv_cache_calls_stay_eager():
    model = lora_model()
    ids, mask = batch(2, 13)
    roles = ("policy", "value", None)  # None: adapters off (the reference)

    def scores():
        out = {}
        with torch.no_grad():
            for role in roles:
                model.set_adapter(role or "policy")
                with model.disable_adapters() if role is None else contextlib.nullcontext():
                    out[role] = model.hidden_states(ids, mask)
        return out

    want = scores()
    merged_model = copy.deepcopy(model)
    merged_model.merge_adapter("value")
    with torch.no_grad():
        want_merged = merged_model.hidden_states(ids, mask)
    # dynamo's guards decide the graphs, so its "eager" backend (no AOTAutograd) is enough here
    compile_model(model, backend="eager")
    loss_and_grads(model, ids, mask, "policy")
    loss_and_grads(model, ids, mask, "value")  # another adapter, the same graph: A and B are its inputs
    assert region_graphs() == 1
    got = scores()  # grad mode off: the second graph, shared by every adapter and the reference
    for role in roles:
        torch.testing.assert_close(got[role], want[role], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got["policy"], got[None], atol=1e-3)  # the adapters do act
    compile_model(merged_model, backend="eager")
    with torch.no_grad():  # a merged adapter runs the base (zero adapter inputs): the same graph again
        torch.testing.assert_close(merged_model.hidden_states(ids, mask), want_merged, rtol=1e-6, atol=1e-6)
    assert region_graphs() == 2
    out = generate(model, ids, mask, max_new_tokens=3, do_sample=False)  # prefill/decode: KV cache, eager
    assert out.sequences.shape == (2, 16) and region_graphs() == 2
    uncompile_model(model)
    assert all(b.compile_options is None for b in model.transformer.h)


def test_compile_model_needs_a_gpt2_block_and_a_known_backend():
    with pytest.raises(ValueError, match="holds no GPT-2 Block"):
        compile_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="compile backend must be one of"):
        compile_model(lora_model(), backend="tvm")


def test_compile_cache_round_trip_and_refusals(tmp_path, monkeypatch):
    assert load_compile_cache(tmp_path / "none") is False  # nothing saved yet: compile from scratch, silently
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    assert save_compile_cache(tmp_path) == len(b"artifacts")
    meta = json.loads((tmp_path / "compile_cache.json").read_text())
    assert meta["where"]["torch"] == torch.__version__ and meta["bytes"] == 9
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    assert load_compile_cache(tmp_path / "compile_cache.bin") is True and loaded == [b"artifacts"]
    # saved for another torch: refused with one warning naming both
    meta["where"]["torch"] = "0.0.1"
    (tmp_path / "compile_cache.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"was saved for .*0\.0\.1.*compiling from scratch"):
        assert load_compile_cache(tmp_path) is False
    # unreadable metadata, then artifacts torch rejects: a warning each, never an exception
    (tmp_path / "compile_cache.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert load_compile_cache(tmp_path) is False
    meta["where"] = compile_mod._where()
    (tmp_path / "compile_cache.json").write_text(json.dumps(meta))

    def corrupt(data):
        raise RuntimeError("bad magic")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", corrupt)
    with pytest.warns(UserWarning, match="could not be loaded.*bad magic"):
        assert load_compile_cache(tmp_path) is False
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert save_compile_cache(tmp_path / "empty") == 0 and not (tmp_path / "empty").exists()
