"""Activation checkpointing per transformer block (`GPTConfig.grad_checkpoint`).

Checkpointed and unchecked runs give the same loss and gradients: full fine-tuning with dropout, LoRA
adapters switched between forward and backward (as the RL update does), the Triton kernels (interpreter),
torch.compile. Checkpointing saves fewer activations, and the setting reaches the model from configs and
the CLI.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast.cli import main, parse
from rlhf_fast.data.tokenizer import TOKENIZER_MARKER
from rlhf_fast.model import GPT, GPTConfig, RewardHead, ScalarHead, add_lora
from rlhf_fast.trainers import ModelSettings, RunSettings, TrainConfig
from rlhf_fast.trainers.builders import build_model
from rlhf_fast.trainers.models import PPOModels
from rlhf_fast.trainers.ppo import load_ppo_models
from rlhf_fast.trainers.reward import REWARD_HEAD_FILE

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                 reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)")


def _batch(B=3, T=13, seed=0):
    """Left-padded ids (garbage under the padding) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 320, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    return ids, mask


def _lm_loss(logits, ids, mask):
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return (nll * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_loss_and_grads(run, atol=1e-7, rtol=1e-6):
    """run(grad_checkpoint) -> (loss, {name: grad}); both runs must agree to rounding."""
    loss, grads = run(False)
    loss_ckpt, grads_ckpt = run(True)
    torch.testing.assert_close(loss_ckpt, loss, atol=atol, rtol=rtol)
    assert grads_ckpt.keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, f"{name}: no gradient"
        torch.testing.assert_close(grads_ckpt[name], grad, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _lora_model(backend: str, grad_checkpoint: bool) -> GPT:
    """tiny with adapters policy and value, their B non-zero (B = 0 would make them no-ops)."""
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", attn_backend=backend, kernel_backend=backend, grad_checkpoint=grad_checkpoint)
    add_lora(model, "policy", rank=4)
    add_lora(model, "value", rank=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.2)
    return model.eval()  # the RL update runs in eval mode: grad mode, not .training, turns checkpointing on


# ---- gradients equal the unchecked run ----------------------------------------------------------


@pytest.mark.parametrize("attn_backend", ["torch", "sdpa"])
def test_full_fine_tuning_with_dropout(attn_backend):
    ids, mask = _batch()

    def run(grad_checkpoint):
        torch.manual_seed(0)
        model = GPT.from_preset("tiny", attn_backend=attn_backend, dropout=0.1, grad_checkpoint=grad_checkpoint)
        model.train()
        torch.manual_seed(1)  # the same dropout masks; the recomputation must replay them
        loss = _lm_loss(model(ids, mask), ids, mask)
        loss.backward()
        return loss.detach(), _grads(model)

    _assert_same_loss_and_grads(run)


@pytest.mark.parametrize("at_backward", ["policy", "value", "off"])
def test_lora_adapters_switched_between_forward_and_backward(at_backward):
    # As the RL update: a policy forward, a value forward, one backward after the adapter has changed
    # again. The recomputation must use each forward's adapter, not the one active at backward time.
    ids, mask = _batch()

    def run(grad_checkpoint):
        model = _lora_model("torch", grad_checkpoint)
        model.set_adapter("policy")
        loss = _lm_loss(model(ids, mask), ids, mask)
        model.set_adapter("value")
        loss = loss + model.hidden_states(ids, mask).pow(2).mean()
        if at_backward == "off":
            with model.disable_adapters():
                loss.backward()
        else:
            model.set_adapter(at_backward)
            loss.backward()
        return loss.detach(), _grads(model)

    _assert_same_loss_and_grads(run)


@interpreter
def test_triton_kernels():
    # LoRA-linear and attention through the Triton kernels (interpreter), the adapter switched before backward.
    ids, mask = _batch(B=2, T=9)

    def run(grad_checkpoint):
        model = _lora_model("triton", grad_checkpoint)
        model.set_adapter("policy")
        loss = model.hidden_states(ids, mask).pow(2).mean()
        model.set_adapter("value")
        loss.backward()
        return loss.detach(), {n: g for n, g in _grads(model).items() if n.endswith(".policy")}

    _assert_same_loss_and_grads(run)


def test_ppo_roles_policy_and_value_in_one_backward():
    # PPOModels as the single-engine LoRA update calls it: both adapter contexts have exited at backward.
    ids, mask = _batch(T=17)

    def run(grad_checkpoint):
        model = _lora_model("torch", grad_checkpoint)
        torch.manual_seed(2)
        models = PPOModels(model, ScalarHead(model.config.n_embd))
        logprobs, entropy = models.policy_logprobs(ids, mask, first_action=9, with_entropy=True)
        values = models.values(ids, mask, first_action=9)
        loss = -logprobs.mean() - 0.01 * entropy.mean() + values.pow(2).mean()
        loss.backward()
        return loss.detach(), _grads(models)

    _assert_same_loss_and_grads(run)


@pytest.mark.parametrize("backend", ["aot_eager_decomp_partition", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model(backend):
    # fullgraph: the checkpointed blocks trace without a graph break; the min-cut partitioner (both backends)
    # then recomputes them in the compiled backward from the traced graph, whatever adapter is active then.
    # Compiled against eager: decompositions round differently, hence the looser tolerance.
    torch._dynamo.reset()
    ids, mask = _batch()

    def run(grad_checkpoint):
        model = _lora_model("torch", grad_checkpoint)
        forward = torch.compile(model, backend=backend, fullgraph=True) if grad_checkpoint else model
        loss = _lm_loss(forward(ids, mask), ids, mask)
        with model.disable_adapters():
            loss.backward()
        return loss.detach(), {n: g for n, g in _grads(model).items() if n.endswith(".policy")}

    try:
        _assert_same_loss_and_grads(run, atol=1e-5, rtol=1e-4)
    finally:
        torch._dynamo.reset()


# ---- what checkpointing changes -------------------------------------------------------------------


def _saved_activation_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward during a forward."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[(t.data_ptr(), t.shape, t.stride())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden_states(ids)
    return sum(saved.values())


def test_checkpointing_saves_fewer_activations():
    ids = torch.randint(0, 320, (4, 64))
    # eval mode, as in the RL update: grad mode, not .training, turns checkpointing on
    full = _saved_activation_bytes(GPT.from_preset("tiny", attn_backend="torch").eval(), ids)
    ckpt = _saved_activation_bytes(GPT.from_preset("tiny", attn_backend="torch", grad_checkpoint=True).eval(), ids)
    assert ckpt < full / 4, (ckpt, full)


def test_a_kv_cache_prefill_with_grad_is_not_checkpointed():
    # The blocks write the cache as they run: a checkpointed block is run without it (the cache stays empty).
    from rlhf_fast.model.kv_cache import KVCache

    ids, mask = _batch()
    caches = []
    for grad_checkpoint in (False, True):
        torch.manual_seed(0)
        model = GPT.from_preset("tiny", attn_backend="torch", grad_checkpoint=grad_checkpoint)
        cache = KVCache.for_model(model.config, ids.shape[0], ids.shape[1] + 2, torch.float32, "cpu")
        model(ids, mask, kv_cache=cache)
        caches.append(cache)
    assert caches[0].layers[0].k.abs().max() > 0
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        torch.testing.assert_close(b.k, a.k, atol=0, rtol=0)
        torch.testing.assert_close(b.v, a.v, atol=0, rtol=0)


def test_config_validation():
    assert GPTConfig().grad_checkpoint is False
    with pytest.raises(ValueError, match="grad_checkpoint"):
        GPTConfig(grad_checkpoint="yes")


# ---- from configs and the CLI to the model -------------------------------------------------------


def test_build_model_applies_the_model_setting(tmp_path):
    for on in (False, True):
        config = TrainConfig(model=ModelSettings(preset="tiny", grad_checkpoint=on),
                             run=RunSettings(output_dir=str(tmp_path), device="cpu"))
        model, _ = build_model(config, adapter="policy")
        assert model.config.grad_checkpoint is on


def test_cli_flags_set_the_config(monkeypatch):
    for command in ("sft", "rm", "dpo", "grpo"):
        assert parse([command, "--grad-checkpoint"])[1].model.grad_checkpoint is True
        assert parse([command])[1].model.grad_checkpoint is False

    class Loaded(Exception):
        pass

    def load_ppo_models(*args, **kwargs):
        raise Loaded(kwargs)

    monkeypatch.setattr("rlhf_fast.trainers.ppo.load_ppo_models", load_ppo_models)
    for flags, on in (([], False), (["--grad-checkpoint"], True)):
        with pytest.raises(Loaded) as loaded:
            main(["ppo", "--sft-model", "s", "--reward-model", "r", *flags])
        assert loaded.value.args[0]["grad_checkpoint"] is on


def _export(directory, reward: bool = False):
    torch.manual_seed(0)
    GPT.from_preset("tiny").save_pretrained(directory)
    (directory / TOKENIZER_MARKER).write_text(json.dumps({"tokenizer": "byte"}))
    if reward:
        torch.save(RewardHead(32).state_dict(), directory / REWARD_HEAD_FILE)
    return directory


@pytest.mark.parametrize("lora", [True, False])
def test_load_ppo_models_checkpoints_the_trained_models(tmp_path, lora):
    sft, rm = _export(tmp_path / "sft"), _export(tmp_path / "rm", reward=True)
    models, _ = load_ppo_models(sft, rm, lora=lora, attn_backend="torch", grad_checkpoint=True)
    assert models.policy.config.grad_checkpoint
    if not lora:
        assert models.critic.config.grad_checkpoint
    default, _ = load_ppo_models(sft, rm, lora=lora, attn_backend="torch")
    assert not default.policy.config.grad_checkpoint
