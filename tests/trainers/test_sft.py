import json

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.data import ByteTokenizer, SFTCollator, SFTDataset, SFTExample, synthetic_preferences
from rlhf_fast.model import GPT, add_lora
from rlhf_fast.trainers import build_sft_trainer
from rlhf_fast.trainers.sft import cold_start, response_nll


def test_prompt_and_padding_tokens_are_exactly_excluded():
    tok = ByteTokenizer()
    ds = SFTDataset([SFTExample("prompt one", "yes"), SFTExample("hi", "a longer answer")], tok, 16, 40)
    b = SFTCollator(tok)([ds[0], ds[1]])
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="torch", kernel_backend="torch").double()
    ids, attn, lm = b["input_ids"], b["attention_mask"], b["loss_mask"]
    loss = response_nll(model, ids, attn, lm)
    # reference: the full logits, summed over response+EOS targets only, position by position
    logits = model(ids, attn)
    ref = 0.0
    for i in range(2):
        for t in range(1, ids.shape[1]):
            if lm[i, t]:
                ref = ref - torch.log_softmax(logits[i, t - 1], -1)[ids[i, t]]
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    assert int(lm[:, 1:].sum()) == len("yes") + 1 + len("a longer answer") + 1
    # the same gradients as the logits path, and none from prompt or padding targets
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(ref, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)
    h = model.hidden_states(ids, attn).detach().requires_grad_()
    (dh,) = torch.autograd.grad(-model.lm_head(h[:, :-1], torch.where(lm[:, 1:].bool(), ids[:, 1:], -1))
                                .logprobs.sum(), h)
    predicts_response = torch.zeros_like(lm, dtype=torch.bool)
    predicts_response[:, :-1] = lm[:, 1:].bool()
    assert dh[~predicts_response].abs().max() == 0
    assert dh[predicts_response].abs().sum(-1).min() > 0


def test_sft_loss_falls_on_synthetic_task(tmp_path, make_config):
    cfg = make_config(tmp_path, steps=40, micro=8, lr=3e-3, synthetic_size=400, eval_size=32)
    trainer = build_sft_trainer(cfg)
    before = trainer.evaluate()["loss"]
    history = trainer.train()
    after = trainer.evaluate()["loss"]
    assert before > 5.0  # ~ln(320) for a random-init tiny model
    assert after < 0.6 * before, (before, after)
    assert sum(h["loss"] for h in history[-5:]) < 0.6 * sum(h["loss"] for h in history[:5])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in rec for rec in lines) and any("train/tokens_per_s" in rec for rec in lines)
    assert lines[0]["event"]["skipped_bad_examples"] == 0


def test_compiled_step_matches_eager(tmp_path, make_config):
    # Regional compilation (dynamo + AOTAutograd here: inductor's C++ build is minutes on CPU): the same
    # losses as eager, and batches of other lengths reuse the first step's graph.
    kw = dict(steps=3, micro=2, lora=True)
    eager = build_sft_trainer(make_config(tmp_path / "eager", **kw)).train()
    torch._dynamo.reset()
    compiled_trainer = build_sft_trainer(make_config(tmp_path / "compiled", compile=True,
                                                     compile_backend="aot_eager", **kw))
    assert all(b.compile_options is not None for b in compiled_trainer.module.model.transformer.h)
    compiled = compiled_trainer.train()
    for e, c in zip(eager, compiled):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4, abs=1e-5)
    assert compiled[0]["compiles"] >= 1 and [c["compiles"] for c in compiled[1:]] == [0, 0]
    assert len({c["tokens"] for c in compiled}) > 1  # the steps really had different shapes
    torch._dynamo.reset()


def test_lora_export_is_merged_hf_model(tmp_path, make_config):
    trainer = build_sft_trainer(make_config(tmp_path, steps=3, lr=1e-2, lora=True))
    trainer.train()
    out = trainer.export(tmp_path / "export")
    assert json.loads((out / "rlhf_fast_tokenizer.json").read_text()) == {"tokenizer": "byte"}
    merged = GPT.from_pretrained(str(out), attn_backend="sdpa")
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), trainer.module.model(ids), atol=1e-4, rtol=1e-4)
        with trainer.module.model.disable_adapters():  # and the adapter did change the model
            assert not torch.allclose(merged(ids), trainer.module.model(ids), atol=1e-4)


def test_max_len_beyond_the_context_fails_before_step_1(tmp_path, make_config):
    # tiny has n_positions=128: without this check the first long batch fails, many steps into the run
    with pytest.raises(ValueError, match=r"^--max-len 129 exceeds the model's n_positions=128 \(tiny\): "
                                         r"lower --max-len$"):
        build_sft_trainer(make_config(tmp_path, max_len=129))
    assert not (tmp_path / "metrics.jsonl").exists()
    build_sft_trainer(make_config(tmp_path / "ok", max_len=128))  # exactly the context: fine


def test_max_len_error_through_cli(tmp_path, user_error):
    args = ["sft", "--preset", "tiny", "--device", "cpu", "--max-len", "2048", "--no-progress",
            "--output-dir", str(tmp_path)]
    line = user_error(args)
    assert line == "rlhf-fast: error: --max-len 2048 exceeds the model's n_positions=128 (tiny): lower --max-len"
    with pytest.raises(ValueError, match="n_positions"):
        main(["--debug", *args])


def test_truncated_responses_are_counted_and_logged(tmp_path, make_config, caplog):
    with caplog.at_level("INFO"):  # synthetic prompt + response + EOS: 71 to 84+ bytes; 80 cuts some
        trainer = build_sft_trainer(make_config(tmp_path, max_len=80, synthetic_size=200))
    train_ds = trainer.batches.dataset
    assert 0 < train_ds.n_truncated < len(train_ds)
    assert f"sft data: {train_ds.n_truncated} of {len(train_ds)} train" in caplog.text
    event = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["event"]
    assert event["truncated_train_examples"] == train_ds.n_truncated


def test_cold_start_trains_the_base_with_adapters_off():
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend="sdpa")
    add_lora(model, "policy", rank=4)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    losses = cold_start(model, ByteTokenizer(), [ex.to_sft() for ex in synthetic_preferences(64, 0)], steps=12,
                        lr=3e-3, batch_size=8)
    assert len(losses) == 12 and losses[-1] < losses[0]
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in adapter.items())  # the adapter is untouched ...
    assert all(not torch.equal(after[n], v) for n, v in base.items() if n.endswith("weight"))  # ... the base not
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # base frozen again
    assert all(m.active_adapter == "policy" for m in model.modules() if hasattr(m, "active_adapter"))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        cold_start(model, ByteTokenizer(), [], steps=0)
