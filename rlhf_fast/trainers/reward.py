"""Reward-model training: pairwise loss -log sigmoid(r_chosen - r_rejected), score at the last real token."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_fast.data import PreferenceCollator, PreferenceDataset, ResumableBatches, load_preference_splits
from rlhf_fast.model import GPT, RewardHead, reward_scores, save_adapter
from rlhf_fast.model.hf import SCORE_WEIGHT

from .builders import build_model, export_model, export_peft_adapter, train_strategy
from .config import TrainConfig
from .loop import Trainer, TrainModule
from .metrics import log
from .sft import check_max_len

REWARD_HEAD_FILE = "reward_head.pt"  # older exports' head (a torch.save); new ones hold score.weight + the file below
ADAPTER_HEAD_FILE = "reward_head.safetensors"  # the head as trained, beside the LoRA adapter on the unmerged base
REWARD_ADAPTER_FILE = "reward_adapter.pt"  # LoRA RMs: the adapter itself, for PPO on the same frozen base
REWARD_META_FILE = "rlhf_fast_reward.json"


def weights_fingerprint(model: GPT) -> str:
    """sha256 of the base weights (LoRA adapters excluded): tells whether two models share one base."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if ".lora_" not in name:
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pairwise_loss_terms(chosen: torch.Tensor, rejected: torch.Tensor):
    """Per-pair (loss, correct, margin) for scores (B,): loss = -log sigmoid(chosen - rejected)."""
    margin = chosen.float() - rejected.float()
    return -F.logsigmoid(margin), (margin > 0).float(), margin


class RewardTrainer(Trainer):
    stage = "rm"

    def __init__(self, config, module, tokenizer, train_batches, eval_dataset, strategy):
        if module.head is None:
            raise ValueError("RewardTrainer needs a TrainModule with a reward head")
        self.adapter = "reward" if config.lora.enabled else None
        super().__init__(config, module, tokenizer, train_batches, eval_dataset, strategy)

    def scores(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores (B,) of a PreferenceCollator batch (chosen rows first)."""
        s = reward_scores(self.module.model, self.module.head, batch["input_ids"], batch["attention_mask"])
        return s.chunk(2)

    def loss_count(self, batch):
        return torch.tensor(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)

    def micro_loss(self, batch, count):
        loss, correct, margin = pairwise_loss_terms(*self.scores(batch))
        return loss.sum() / count, {"accuracy": correct.sum() / count, "margin": margin.sum() / count}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.module.eval()
        collate = PreferenceCollator(self.tokenizer)
        bs = self.config.optim.micro_batch_size
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        n = len(self.eval_dataset)
        for i in range(0, n, bs):
            b = self._to_device(collate([self.eval_dataset[j] for j in range(i, min(i + bs, n))]))
            with self.strategy.autocast():
                terms = pairwise_loss_terms(*self.scores(b))
            for k, t in zip(sums, terms):
                sums[k] += float(t.sum())
        return {k: v / n for k, v in sums.items()}

    def export(self, directory):
        """The merged RM as an HF directory that is also a GPT2ForSequenceClassification (`score.weight`, see
        `export_model`), + for LoRA RMs the adapter and its head (PPO puts them on the SFT base)."""
        from safetensors.torch import save_file

        model, head = self.module.model, self.module.head
        directory = export_model(model, self.tokenizer, directory, merge_adapter=self.adapter, score_head=head)
        meta = {"head": SCORE_WEIGHT, "score": "last real token"}
        if self.adapter is not None:  # PPO can then put this adapter on the SFT base instead of a 2nd model
            save_adapter(model, self.adapter, directory / REWARD_ADAPTER_FILE)
            save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()},
                      str(directory / ADAPTER_HEAD_FILE))
            meta.update(adapter=REWARD_ADAPTER_FILE, adapter_head=ADAPTER_HEAD_FILE,
                        base_fingerprint=weights_fingerprint(model))
        (directory / REWARD_META_FILE).write_text(json.dumps(meta))
        export_peft_adapter(self.config, model, self.adapter, self.tokenizer, directory, score_head=head)
        return directory


def load_reward_model(directory, **config_overrides) -> tuple[GPT, RewardHead]:
    """(model, head) of an exported reward model: the merged model with its `score.weight` (what HF's
    GPT2ForSequenceClassification loads; the head's bias is folded into ln_f, so the head's is 0), or, in an
    older export, reward_head.pt."""
    directory = Path(directory)
    weight = _score_weight(directory)
    legacy = directory / REWARD_HEAD_FILE
    if weight is None and not legacy.is_file():
        raise FileNotFoundError(f"{directory} has no {SCORE_WEIGHT} in model.safetensors and no {REWARD_HEAD_FILE}: "
                                "not an exported reward model")
    model = GPT.from_pretrained(str(directory), **config_overrides)
    head = RewardHead(model.config.n_embd)
    if weight is None:
        head.load_state_dict(torch.load(legacy, map_location="cpu", weights_only=True))
    else:
        head.load_state_dict({"proj.weight": weight.float(), "proj.bias": torch.zeros(1)})
    return model, head


def load_adapter_head(directory) -> RewardHead:
    """The reward head that goes with a LoRA RM export's adapter (on the unmerged base, where ln_f holds no
    folded bias): reward_head.safetensors, or reward_head.pt in older exports."""
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / ADAPTER_HEAD_FILE
    if path.is_file():
        state = load_file(str(path))
    elif (directory / REWARD_HEAD_FILE).is_file():
        state = torch.load(directory / REWARD_HEAD_FILE, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} has no {ADAPTER_HEAD_FILE}: the reward adapter's head is missing")
    head = RewardHead(state["proj.weight"].shape[1])
    head.load_state_dict(state)
    return head


def _score_weight(directory: Path) -> torch.Tensor | None:
    """score.weight (1, C) of an export's model.safetensors, or None (an older export, or sharded weights)."""
    from safetensors import safe_open

    path = directory / "model.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(SCORE_WEIGHT) if SCORE_WEIGHT in f.keys() else None
    except Exception as e:  # a truncated file: say which
        raise ValueError(f"{path}: corrupt or truncated weights ({type(e).__name__}: {e})") from e


def build_reward_trainer(config: TrainConfig) -> RewardTrainer:
    """Everything an RM run needs: base model (+ adapter `reward`) with a reward head, pairs, strategy."""
    if config.stage != "rm":
        raise ValueError(f"build_reward_trainer needs a config with stage='rm', got {config.stage!r}")
    model, tokenizer = build_model(config, adapter="reward")
    check_max_len(config, model)
    head = RewardHead(model.config.n_embd)
    d = config.data
    train, held_out, report = load_preference_splits(d.data, subset=d.subset, eval_size=d.eval_size,
                                                     synthetic_size=d.synthetic_size, seed=config.run.seed,
                                                     skip_bad_examples=d.skip_bad_examples,
                                                     chat_template=d.chat_template)
    train_ds = PreferenceDataset(train, tokenizer, d.max_prompt_len, d.max_len)
    eval_ds = PreferenceDataset(held_out, tokenizer, d.max_prompt_len, d.max_len)
    batches = ResumableBatches(train_ds, config.optim.micro_batch_size, PreferenceCollator(tokenizer),
                               seed=config.run.seed)
    module = TrainModule(model, head)
    trainer = RewardTrainer(config, module, tokenizer, batches, eval_ds, train_strategy(config))
    trainer.logger.event(0, data=d.data, train_pairs=len(train_ds), eval_pairs=len(eval_ds),
                         skipped_bad_examples=report.skipped, truncated_train_pairs=train_ds.n_truncated,
                         one_side_truncated_train_pairs=train_ds.n_one_side_truncated,
                         truncated_eval_pairs=eval_ds.n_truncated)
    if trainer.strategy.is_main:
        log.info("rm data: %d of %d train pairs (%d with one side only) and %d of %d eval pairs have a "
                 "response cut to --max-len %d (scored with a forced EOS)", train_ds.n_truncated, len(train_ds),
                 train_ds.n_one_side_truncated, eval_ds.n_truncated, len(eval_ds), d.max_len)
    if report.skipped:
        log.warning("%s: skipped %d bad example(s)", d.data, report.skipped)
    return trainer
