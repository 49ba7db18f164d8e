import pytest
import torch

from rlhf_fast.model import (
    GPT,
    LoRALinear,
    adapter_parameters,
    add_lora,
    disable_adapters,
    load_adapter,
    merge_adapter,
    save_adapter,
    set_adapter,
    unmerge_adapter,
)


def _model():
    torch.manual_seed(0)
    return GPT.from_preset("tiny", attn_backend="torch").eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 320, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def _randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@torch.no_grad()
def test_zero_b_is_identity_and_nonzero_b_changes_output():
    model = _model()
    ids, mask = _batch()
    base = model(ids, mask)
    add_lora(model, "policy", rank=4, alpha=8)
    torch.testing.assert_close(model(ids, mask), base, atol=0, rtol=0)
    _randomize(model, "policy", 1)
    assert (model(ids, mask) - base).abs().max() > 1e-3
    with disable_adapters(model):
        torch.testing.assert_close(model(ids, mask), base, atol=0, rtol=0)
    assert (model(ids, mask) - base).abs().max() > 1e-3  # re-enabled after the block


def test_lora_targets_and_trainable_params():
    model = _model()
    add_lora(model, "policy", rank=4)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 4 * model.config.n_layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert model.lm_head.weight is model.transformer.wte.weight
    # Only adapter weights get gradients.
    ids, mask = _batch()
    _randomize(model, "policy", 2)
    model(ids, mask).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


@torch.no_grad()
def test_merge_equals_unmerged_and_unmerge_restores():
    model = _model()
    ids, mask = _batch()
    base = model(ids, mask)
    add_lora(model, "policy", rank=4)
    _randomize(model, "policy", 3)
    unmerged = model(ids, mask)
    merge_adapter(model, "policy")
    torch.testing.assert_close(model(ids, mask), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        with disable_adapters(model):
            pass
    unmerge_adapter(model)
    torch.testing.assert_close(model(ids, mask), unmerged, atol=1e-5, rtol=1e-5)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids, mask), base, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_two_adapters_switch():
    model = _model()
    ids, mask = _batch()
    add_lora(model, "policy", rank=4)
    add_lora(model, "value", rank=2, targets=("attn.c_attn",))
    _randomize(model, "policy", 4)
    _randomize(model, "value", 5)
    set_adapter(model, "policy")
    out_policy = model(ids, mask)
    set_adapter(model, "value")
    out_value = model(ids, mask)
    assert (out_policy - out_value).abs().max() > 1e-3
    set_adapter(model, "policy")
    torch.testing.assert_close(model(ids, mask), out_policy, atol=0, rtol=0)
    # Same result as a model that only ever had the policy adapter.
    solo = _model()
    add_lora(solo, "policy", rank=4)
    _randomize(solo, "policy", 4)
    torch.testing.assert_close(solo(ids, mask), out_policy, atol=1e-6, rtol=1e-6)
    set_adapter(model, None)
    with disable_adapters(model):
        base = model(ids, mask)
    torch.testing.assert_close(model(ids, mask), base, atol=0, rtol=0)


@torch.no_grad()
def test_adapter_save_load_round_trip(tmp_path):
    model = _model()
    ids, mask = _batch()
    add_lora(model, "policy", rank=4)
    _randomize(model, "policy", 6)
    want = model(ids, mask)
    save_adapter(model, "policy", tmp_path / "policy.pt")
    fresh = _model()
    assert load_adapter(fresh, tmp_path / "policy.pt") == "policy"
    torch.testing.assert_close(fresh(ids, mask), want, atol=0, rtol=0)


def test_save_pretrained_merge_adapter(tmp_path):
    model = _model()
    ids, mask = _batch()
    add_lora(model, "policy", rank=4)
    _randomize(model, "policy", 7)
    with torch.no_grad():
        want = model(ids, mask)
    model.save_pretrained(tmp_path / "merged", merge_adapter="policy")
    merged = GPT.from_pretrained(str(tmp_path / "merged"), attn_backend="torch").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, mask), want, atol=1e-5, rtol=1e-5)


def test_lora_bad_input(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="rank"):
        add_lora(model, "policy", rank=0)
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        add_lora(model, "policy", targets=("nothing",))
    with pytest.raises(ValueError, match="identifier"):
        add_lora(model, "my.adapter")
    add_lora(model, "policy")
    with pytest.raises(ValueError, match="already exists"):
        add_lora(model, "policy")
    with pytest.raises(ValueError, match="no adapter named"):
        set_adapter(model, "critic")
    with pytest.raises(FileNotFoundError, match="adapter file not found"):
        load_adapter(model, tmp_path / "missing.pt")
    other = GPT.from_preset("tiny", n_embd=64)
    add_lora(other, "policy", rank=4)
    save_adapter(other, "policy", tmp_path / "other.pt")
    with pytest.raises(ValueError, match="shape"):
        load_adapter(model, tmp_path / "other.pt")
