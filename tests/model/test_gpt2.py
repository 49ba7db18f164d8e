import pytest
import torch

from rlhf_fast.model import GPT, GPTConfig, preset_config

transformers = pytest.importorskip("transformers")


def _hf_model(tmp_path, **kw):
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=101,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    return hf


def _left_padded_batch(vocab=101):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :12] = 0  # a single real token
    return ids, mask


@torch.no_grad()
def test_hf_parity_unpadded(tmp_path):
    hf = _hf_model(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path / "hf"), attn_backend="torch").eval()
    ids = torch.randint(0, 101, (2, 17))
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@torch.no_grad()
def test_hf_parity_left_padded(tmp_path, backend):
    hf = _hf_model(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path / "hf"), attn_backend=backend).eval()
    ids, mask = _left_padded_batch()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    ref = hf(ids, attention_mask=mask, position_ids=pos).logits
    got = ours(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


@torch.no_grad()
def test_padded_row_matches_row_alone():
    model = GPT.from_preset("tiny", attn_backend="torch").eval()
    ids, mask = _left_padded_batch(vocab=320)
    batched = model(ids, mask)
    for i in range(3):
        real = mask[i].bool()
        alone = model(ids[i : i + 1, real])
        torch.testing.assert_close(batched[i, real], alone[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=77)).eval()
    ours.save_pretrained(tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 77, (2, 9))
    torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
    again = GPT.from_pretrained(str(tmp_path / "out")).eval()
    torch.testing.assert_close(again(ids), ours(ids), atol=0, rtol=0)
    # the weights are as readable as the config (safetensors' private temporary file left them 0600)
    mode = lambda name: (tmp_path / "out" / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("model.safetensors") == mode("config.json")


def test_hidden_states_shape_and_tied_head():
    model = GPT.from_preset("tiny")
    ids = torch.randint(0, 320, (2, 5))
    h = model.hidden_states(ids)
    assert h.shape == (2, 5, 32)
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model(ids), h @ model.transformer.wte.weight.T)


def test_hf_preset_shapes():
    shapes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}
    for name, (n_layer, n_head, n_embd) in shapes.items():
        cfg = preset_config(name)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.n_positions) == (
            n_layer, n_head, n_embd, 50257, 1024)
    with torch.device("meta"):
        assert GPT(preset_config("gpt2")).num_parameters() == 124_439_808


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="torch").eval()
    ids, mask = _left_padded_batch(vocab=320)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask), model(ids, mask), atol=1e-5, rtol=1e-5)


# ---- bad input -------------------------------------------------------------------------------


def test_invalid_config():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="attn_backend"):
        GPTConfig(attn_backend="magic")
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("gpt5")


def test_from_pretrained_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        GPT.from_pretrained(str(tmp_path / "nope"))


def test_from_pretrained_not_gpt2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint"):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_no_weights(tmp_path):
    _hf_model(tmp_path)
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        GPT.from_pretrained(str(tmp_path / "hf"))


def test_out_of_vocab_and_too_long():
    model = GPT.from_preset("tiny")
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, 2, 320]]))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds the model's n_positions"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5))


def test_flash_decode_glue_passes_each_rows_valid_range(monkeypatch):
    """flash-attn is not installable here: check our glue (layout, per-row [start, end) from the cache
    mask) against a stand-in with flash_attn_with_kvcache's documented semantics."""
    import sys
    import types

    from rlhf_fast.kernels import reference
    from rlhf_fast.model.gpt2 import _flash_attention

    def fake_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, cache_leftpad, causal):
        assert q.shape[1] == 1 and k_cache.stride(-1) == 1 and causal  # (B, 1, H, D) query, BTHD cache
        slots = torch.arange(k_cache.shape[1])
        valid = (slots >= cache_leftpad[:, None].long()) & (slots < cache_seqlens[:, None].long())
        out = reference.masked_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                         valid, causal=False)
        return out.transpose(1, 2)

    fake = types.SimpleNamespace(flash_attn_with_kvcache=fake_with_kvcache, flash_attn_func=None,
                                 flash_attn_varlen_func=None)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    g = torch.Generator().manual_seed(0)
    B, H, Tk, D = 3, 2, 11, 16
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, H, Tk, D, generator=g), torch.randn(B, H, Tk, D, generator=g)
    mask = torch.zeros(B, Tk, dtype=torch.bool)
    mask[0, 2:9] = True  # left padding, prompt + generated, unwritten tail
    mask[1, 0:11] = True
    mask[2, 8:9] = True  # a single real token
    want = reference.masked_attention(q, k, v, mask, causal=True)
    torch.testing.assert_close(_flash_attention(q, k, v, mask), want)
