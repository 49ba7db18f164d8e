"""GRPO (Shao et al. 2024, DeepSeekMath): G sampled completions per prompt, group-normalised advantages,
no critic, clipped-ratio updates, optional k3 KL to the reference.

One iteration = rollout → score → advantages → update:
  rollout      each prompt repeated G times, sampled with the KV-cached engine under the policy; then,
               over the whole prompt + response batch, the rollout policy's log-probs (and the
               reference's, adapters off, when kl_coef > 0): one forward each, no loop over tokens
  score        a RewardFunction of (prompts, completions) text: a verifiable Python reward or a
               reward model (`RewardModelScorer`)
  advantages   `rl.compute_advantages` with the `grpo` estimator: (score - group mean) / (group std + eps)
  update       `epochs` passes over shuffled minibatches; loss = `rl.ppo_loss` (the fused
               `kernels.ppo_loss`) with vf_coef = 0: no critic, so values are zeros and cost nothing,
               while clipping, the k3 KL term and the token mean stay one fused pass on the GPU.

The loss is a token mean over the minibatch (DAPO's token-level mean, as the PPO kernel defines it),
rather than DeepSeekMath's mean of per-sequence means, which would weigh short answers' tokens more.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf_fast import rl
from rlhf_fast.data import PromptCollator, PromptDataset, ResumableBatches, SFTCollator, SFTDataset
from rlhf_fast.distributed import SingleDeviceStrategy, Strategy
from rlhf_fast.generation import generate
from rlhf_fast.model import GPT, set_adapter
from rlhf_fast.model.lora import adapter_names, disable_adapters

from .checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from .common import build_model, export_model, lr_lambda, resolve_tokenizer_name
from .config import DataSettings, LoRASettings, ModelSettings, OptimSettings, RunSettings
from .metrics import MetricsLogger, log
from .reward_functions import (
    REWARD_FUNCTIONS,
    RewardFunction,
    load_reward_model_scorer,
    reward_function,
    score_completions,
)
from .rollout import action_logprobs
from .sft import response_nll


@dataclass(frozen=True)
class GRPOSettings:
    group_size: int = 8  # G completions per prompt
    prompts_per_iteration: int = 8  # rollout batch = prompts_per_iteration * group_size rows
    iterations: int = 100
    epochs: int = 1  # passes over each rollout; 1 keeps it on-policy (the ratio starts at exactly 1)
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # k3 KL to the reference (adapters off); DeepSeekMath used 0.04
    std_eps: float = 1e-6  # groups whose scores are all equal get advantage 0, not 0/0
    max_new_tokens: int = 16  # the arithmetic answers are <= 11 bytes + EOS
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eval_prompts: int = 64  # held-out prompts scored at each evaluation
    eval_samples: int = 4  # sampled completions per held-out prompt (plus one greedy)

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(
                f"grpo.group_size must be >= 2 (advantages are relative to the group), got {self.group_size}"
            )
        if (
            min(
                self.prompts_per_iteration,
                self.iterations,
                self.epochs,
                self.max_new_tokens,
                self.eval_prompts,
                self.eval_samples,
            )
            < 1
        ):
            raise ValueError(
                "grpo.prompts_per_iteration, iterations, epochs, max_new_tokens, eval_prompts and "
                "eval_samples must be >= 1"
            )
        if self.clip_eps <= 0 or self.kl_coef < 0 or self.std_eps <= 0:
            raise ValueError(
                f"grpo: need clip_eps > 0, kl_coef >= 0, std_eps > 0 (got {self.clip_eps}, "
                f"{self.kl_coef}, {self.std_eps})"
            )

    @property
    def rollout_rows(self) -> int:
        return self.prompts_per_iteration * self.group_size


@dataclass(frozen=True)
class TaskSettings:
    """Where prompts and rewards come from: the built-in verifiable task, or a reward model."""

    task: str | None = (
        "arithmetic"  # built-in verifiable task (rlhf_fast.data.arithmetic); None with reward_model
    )
    reward: str = "arithmetic"  # registered reward function scoring the task (see REWARD_FUNCTIONS)
    reward_model: str | None = None  # an `rlhf-fast rm` export; prompts then come from data.data
    max_operand: int = 9  # arithmetic operands in [0, max_operand]
    ops: str = "+-"
    cold_start_steps: int = 0  # SFT warm-up steps on formatted task answers before GRPO (0: none)
    cold_start_lr: float = 3e-3

    def __post_init__(self):
        if (self.task is None) == (self.reward_model is None):
            raise ValueError(
                "set exactly one reward source: task='arithmetic' or reward_model=<rm export dir>"
            )
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        if self.reward not in REWARD_FUNCTIONS:
            raise ValueError(
                f"unknown reward function {self.reward!r}; choose one of {sorted(REWARD_FUNCTIONS)}"
            )
        if self.cold_start_steps < 0 or self.cold_start_lr <= 0:
            raise ValueError("task.cold_start_steps must be >= 0 and task.cold_start_lr > 0")
        if self.cold_start_steps and self.task is None:
            raise ValueError("task.cold_start_steps needs a built-in task (it trains on the task's answers)")


TASKS = ("arithmetic",)


@dataclass(frozen=True)
class GRPOConfig:
    """model + lora + data + grpo + optim + run. optim.micro_batch_size rows go through one forward,
    grad_accum_steps of them make one optimizer step (a minibatch); optim.max_steps is derived."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    task: TaskSettings = field(default_factory=TaskSettings)
    data: DataSettings = field(default_factory=lambda: DataSettings(max_prompt_len=48, max_len=112))
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    optim: OptimSettings = field(
        default_factory=lambda: OptimSettings(lr=1e-4, warmup_steps=0, schedule="constant")
    )
    run: RunSettings = field(default_factory=lambda: RunSettings(log_every=1, eval_every=10, save_every=10))

    def __post_init__(self):
        if self.lora.enabled is None:  # as for SFT/RM: LoRA when starting from trained weights
            object.__setattr__(
                self, "lora", dataclasses.replace(self.lora, enabled=self.model.model is not None)
            )
        if self.run.output_dir is None:
            object.__setattr__(self, "run", dataclasses.replace(self.run, output_dir="runs/grpo"))
        rows, minibatch = self.grpo.rollout_rows, self.optim.batch_size
        if rows % minibatch:
            raise ValueError(
                f"the rollout's {rows} rows (prompts_per_iteration * group_size) must split into "
                f"whole minibatches of micro_batch_size * grad_accum_steps = {minibatch}"
            )
        steps = self.grpo.iterations * self.grpo.epochs * (rows // minibatch)
        object.__setattr__(self, "optim", dataclasses.replace(self.optim, max_steps=steps))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GRPOConfig:
        """From nested {"section": {...}} (a config file + CLI overrides); unknown keys are errors."""
        sections = {
            "model": ModelSettings,
            "lora": LoRASettings,
            "task": TaskSettings,
            "data": DataSettings,
            "grpo": GRPOSettings,
            "optim": OptimSettings,
            "run": RunSettings,
        }
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; expected {sorted(sections)}")
        factories = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in d.items():
            if not isinstance(value, dict):
                raise ValueError(f"config section {name!r} must be a mapping, got {type(value).__name__}")
            bad = set(value) - {f.name for f in dataclasses.fields(sections[name])}
            if bad:
                raise ValueError(f"unknown key(s) {sorted(bad)} in config section {name!r}")
            kwargs[name] = dataclasses.replace(factories[name](), **value)  # GRPO's defaults, then the file
        return cls(**kwargs)


COLD_START_FILE = "cold_start.pt"


class GRPOTrainer:
    """GRPO on built objects: a GPT (with a `policy` LoRA adapter, or fully trainable), its tokenizer,
    training and held-out prompts, and a RewardFunction."""

    stage = "grpo"

    def __init__(
        self,
        config: GRPOConfig,
        model: GPT,
        tokenizer,
        train_prompts: list[str],
        eval_prompts: list[str],
        reward_fn: RewardFunction,
        strategy: Strategy | None = None,
    ):
        self.config, self.model, self.tokenizer, self.reward_fn = config, model, tokenizer, reward_fn
        g, o = config.grpo, config.optim
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens, the model only "
                f"{model.config.vocab_size}: they do not belong together"
            )
        self.lora = "policy" in adapter_names(model)
        if config.lora.enabled and not self.lora:
            raise ValueError(
                "config.lora.enabled but the model has no 'policy' adapter (add_lora(model, 'policy'))"
            )
        if self.lora:
            set_adapter(model, "policy")
        self.strategy = strategy or SingleDeviceStrategy(
            _device(config), config.run.precision, o.max_grad_norm
        )
        self.device = self.strategy.device
        model.to(self.device)
        # Full-parameter mode needs its own frozen copy as the KL reference; LoRA mode gets it for free
        # by switching the adapters off.
        self.reference = None
        if g.kl_coef > 0 and not self.lora:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("nothing to train: no parameter of the model requires grad")
        decay = [p for p in self.trainable.values() if p.dim() >= 2]
        no_decay = [p for p in self.trainable.values() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=o.betas,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o))
        _, self.optimizer, self.scheduler = self.strategy.prepare(model, optimizer, scheduler)

        max_prompt_len = config.data.max_prompt_len
        if max_prompt_len + g.max_new_tokens > model.config.n_positions:
            raise ValueError(
                f"data.max_prompt_len {max_prompt_len} + grpo.max_new_tokens {g.max_new_tokens} "
                f"exceeds the model's n_positions={model.config.n_positions}"
            )
        if not train_prompts or not eval_prompts:
            raise ValueError("GRPOTrainer needs at least one training and one held-out prompt")
        seed = config.run.seed
        self.batches = ResumableBatches(
            PromptDataset(train_prompts, tokenizer, max_prompt_len),
            g.prompts_per_iteration,
            PromptCollator(tokenizer),
            seed=seed,
        )
        self.eval_prompts = list(eval_prompts)[: g.eval_prompts]
        self.sample_generator = torch.Generator(self.device).manual_seed(seed)
        self.shuffle_generator = torch.Generator().manual_seed(seed + 1)
        self.advantage_config = rl.AdvantageConfig(
            estimator="grpo", group_size=g.group_size, std_eps=g.std_eps
        )
        self.run_dir = Path(config.run.output_dir)
        self.checkpoints = CheckpointManager(self.run_dir, config.run.keep_last)
        self.logger = MetricsLogger(self.run_dir, enabled=self.strategy.is_main)
        self.iteration = 0
        self.history: list[dict] = []  # per-iteration metrics of this process
        self.last_eval: dict[str, float] | None = None

    # --- the steps of one iteration ----------------------------------------------------------------
    def _generate(self, input_ids, attention_mask, *, sample: bool, generator=None):
        g = self.config.grpo
        tok = self.tokenizer
        # no autocast: the KV cache holds the weights' dtype, and generation-time log-probs should match
        # the training-time ones as closely as the precision allows
        return generate(
            self.model,
            input_ids,
            attention_mask,
            max_new_tokens=g.max_new_tokens,
            do_sample=sample,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            generator=(generator or self.sample_generator) if sample else None,
            return_logprobs=sample,
            compile=self.config.run.compile,
        )

    def _now(self) -> float:
        """perf_counter after the device's queued work: phase times measure the work, not the launches."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _completions(self, out) -> list[str]:
        P = out.sequences.shape[1] - out.response_mask.shape[1]
        return [
            self.tokenizer.decode(row[m.bool()].tolist())
            for row, m in zip(out.sequences[:, P:].cpu(), out.response_mask.cpu())
        ]

    def _policy_logprobs(self, sequences, attention_mask, first_action: int, *, reference: bool = False):
        if not reference:
            return action_logprobs(self.model, sequences, attention_mask, first_action=first_action)
        if self.reference is not None:
            return action_logprobs(self.reference, sequences, attention_mask, first_action=first_action)
        with disable_adapters(self.model):
            return action_logprobs(self.model, sequences, attention_mask, first_action=first_action)

    @torch.no_grad()
    def rollout(self, batch: dict) -> tuple[rl.Experience, int, dict[str, float]]:
        """Experience of G completions for each prompt of `batch`; also its first action column."""
        G, times = self.config.grpo.group_size, {}
        input_ids = batch["input_ids"].repeat_interleave(G, dim=0).to(self.device)  # (B, P), B = prompts * G
        prompt_mask = batch["attention_mask"].repeat_interleave(G, dim=0).to(self.device)
        prompts = [p for p in batch["prompts"] for _ in range(G)]
        self.model.eval()
        t0 = self._now()
        out = self._generate(input_ids, prompt_mask, sample=True)
        times["time_generate"] = self._now() - t0
        B, S = out.sequences.shape
        first = input_ids.shape[1] - 1  # action t is token t + 1: the first response token is action P - 1
        action_mask = torch.zeros(B, S - 1, dtype=torch.bool, device=self.device)
        action_mask[:, first:] = out.response_mask.bool()

        t0 = self._now()
        scores = score_completions(self.reward_fn, prompts, self._completions(out), self.device)
        times["time_score"] = self._now() - t0

        t0 = self._now()
        attention_mask = out.attention_mask.bool()
        zero = torch.zeros((), device=self.device)
        with self.strategy.autocast():
            logprobs = self._policy_logprobs(out.sequences, attention_mask, first).float()
            logprobs = torch.where(action_mask, logprobs, zero)  # 0 after EOS, as in Experience
            ref_logprobs = None
            if self.config.grpo.kl_coef > 0:
                ref_logprobs = self._policy_logprobs(
                    out.sequences, attention_mask, first, reference=True
                ).float()
                ref_logprobs = torch.where(action_mask, ref_logprobs, zero)
        # the outcome score sits on the last response token; the grpo estimator sums each row's rewards
        rewards = torch.zeros(B, S - 1, device=self.device)
        last, _ = rl.last_token_index(action_mask)
        rewards[torch.arange(B, device=self.device), last] = scores
        advantages, returns = rl.compute_advantages(self.advantage_config, rewards, action_mask)
        times["time_logprobs"] = self._now() - t0

        gap = (logprobs[:, first:] - out.logprobs).abs()[out.response_mask.bool()]
        grouped = scores.view(-1, G)
        stats = {
            "reward": float(scores.mean()),
            "reward_std": float(scores.std()) if B > 1 else 0.0,
            "groups_without_signal": float((grouped.std(dim=1) == 0).float().mean()),
            "response_length": float(out.response_mask.sum(dim=1).float().mean()),
            "generated_tokens_per_s": float(out.response_mask.sum()) / max(times["time_generate"], 1e-9),
            "logprob_gap_max": float(gap.max()),  # generation-time vs training-time log-probs: ~0 in fp32
            "logprob_gap_mean": float(gap.mean()),
            **times,
        }
        exp = rl.Experience(
            sequences=out.sequences,
            attention_mask=attention_mask,
            action_mask=action_mask,
            logprobs=logprobs,
            advantages=advantages,
            returns=returns,
            ref_logprobs=ref_logprobs,
            rewards=rewards,
            scores=scores,
        )
        return exp, first, stats

    def policy_loss(
        self, exp: rl.Experience, first_action: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped-ratio loss (+ kl_coef * k3 KL) of a micro-batch, token mean over its action tokens."""
        g = self.config.grpo
        logprobs, entropy = action_logprobs(
            self.model, exp.sequences, exp.attention_mask, first_action=first_action, with_entropy=True
        )
        zeros = torch.zeros_like(logprobs)
        loss, metrics = rl.ppo_loss(
            logprobs,
            exp.logprobs,
            exp.advantages,
            zeros,
            zeros,
            zeros,
            exp.action_mask,
            clip_eps=g.clip_eps,
            vf_coef=0.0,
            ref_logprobs=exp.ref_logprobs,
            kl_coef=g.kl_coef,
            backend=self.config.model.kernel_backend,
        )
        metrics.pop("value_loss")
        metrics["entropy"] = rl.masked_mean(entropy.detach(), exp.action_mask)
        return loss, metrics

    def update(self, exp: rl.Experience, first_action: int) -> dict[str, float]:
        """`epochs` passes of minibatch optimizer steps over the rollout; mean metrics over the steps."""
        o = self.config.optim
        self.model.train()
        totals: dict[str, float] = {}
        n_steps = 0
        for _ in range(self.config.grpo.epochs):
            order = torch.randperm(len(exp), generator=self.shuffle_generator).to(self.device)
            for start in range(0, len(exp), o.batch_size):
                minibatch = exp.select(order[start : start + o.batch_size])
                count = minibatch.action_mask.sum().clamp(min=1)
                for micro in minibatch.split(o.micro_batch_size):
                    # each micro-batch's token mean, weighted by its share of the minibatch's tokens:
                    # exactly the minibatch's token mean, however it is split
                    weight = micro.action_mask.sum() / count
                    with self.strategy.autocast():
                        loss, metrics = self.policy_loss(micro, first_action)
                    self.strategy.backward(loss * weight)
                    for k, v in {"loss": loss, **metrics}.items():
                        totals[k] = totals.get(k, 0.0) + float(v.detach() * weight)
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + self.strategy.step()
                n_steps += 1
        stats = {k: v / n_steps for k, v in totals.items()}
        stats["lr"] = self.scheduler.get_last_lr()[0]
        return stats

    @torch.no_grad()
    def evaluate(self, prompts: list[str] | None = None, batch_size: int = 64) -> dict[str, float]:
        """Mean reward on held-out prompts: `reward` over eval_samples sampled completions per prompt (the
        expected reward GRPO maximises, from a fixed seed, so repeatable), `greedy_reward` of greedy ones."""
        prompts = self.eval_prompts if prompts is None else list(prompts)
        k = self.config.grpo.eval_samples
        generator = torch.Generator(self.device).manual_seed(self.config.run.seed + 2)
        self.model.eval()
        sampled, greedy = [], []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            ids = [self.tokenizer.encode(p)[-self.config.data.max_prompt_len :] for p in chunk]
            input_ids, mask = (t.to(self.device) for t in self.tokenizer.pad(ids, side="left"))
            out = self._generate(input_ids, mask, sample=False)
            greedy.append(score_completions(self.reward_fn, chunk, self._completions(out)))
            out = self._generate(
                input_ids.repeat_interleave(k, 0),
                mask.repeat_interleave(k, 0),
                sample=True,
                generator=generator,
            )
            repeated = [p for p in chunk for _ in range(k)]
            sampled.append(score_completions(self.reward_fn, repeated, self._completions(out)))
        return {"reward": float(torch.cat(sampled).mean()), "greedy_reward": float(torch.cat(greedy).mean())}

    # --- the loop ----------------------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        exp, first, stats = self.rollout(next(self.batches))
        t0 = self._now()
        stats.update(self.update(exp, first))
        stats["time_update"] = self._now() - t0
        if self.device.type == "cuda":
            stats["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return stats

    def train(self, until_iteration: int | None = None) -> list[dict]:
        """Run to grpo.iterations (or stop early at `until_iteration`, saving a checkpoint there)."""
        run, total = self.config.run, self.config.grpo.iterations
        stop = total if until_iteration is None else min(until_iteration, total)
        if self.strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        if run.resume:
            self.resume()
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            initial=self.iteration,
            desc=self.stage,
            dynamic_ncols=True,
            disable=not (run.progress and self.strategy.is_main),
        )
        while self.iteration < stop:
            stats = self.train_iteration()
            self.iteration += 1
            self.history.append(stats)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.4f}")
            if run.log_every and self.iteration % run.log_every == 0:
                self.logger.log(self.iteration, stats)
            if run.eval_every and self.iteration % run.eval_every == 0 and self.iteration < total:
                self._log_eval()
            if run.save_every and self.iteration % run.save_every == 0 and self.iteration < stop:
                self.save()
        bar.close()
        if self.iteration >= total:
            self._log_eval()
        self.save()
        self.logger.close()
        return self.history

    def _log_eval(self) -> dict[str, float]:
        metrics = self.last_eval = self.evaluate()
        self.logger.log(self.iteration, metrics, prefix="eval")
        log.info(
            "iteration %d eval: %s", self.iteration, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        )
        return metrics

    def export(self, directory) -> Path:
        """HF GPT-2 directory of the policy (adapter merged in) that `--model` and HF load."""
        name = resolve_tokenizer_name(self.config)
        return export_model(
            self.model, self.tokenizer, name, directory, merge_adapter="policy" if self.lora else None
        )

    # --- checkpoints -------------------------------------------------------------------------------
    def save(self) -> Path | None:
        if not self.strategy.is_main:
            return None
        weights = {n: p.detach().cpu().clone() for n, p in self.trainable.items()}
        generators = {
            "sample": self.sample_generator.get_state(),
            "shuffle": self.shuffle_generator.get_state(),
        }
        path = self.checkpoints.save(
            self.iteration,
            {
                "weights": weights,
                "optim": self.strategy.state_dict(),
                "rng": capture_rng_state(),
                "generators": generators,
            },
            {"data": self.batches.state_dict(), "stage": self.stage},
        )
        self.logger.event(self.iteration, checkpoint=str(path))
        return path

    def resume(self) -> bool:
        """Load the newest complete checkpoint of the run directory; False when there is none."""
        loaded = self.checkpoints.load_latest(self.stage, self.trainable)
        if loaded is None:
            log.info("no checkpoint in %s: starting from iteration 0", self.checkpoints.dir)
            return False
        path, blobs, state = loaded
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(blobs["weights"][n])
        self.strategy.load_state_dict(blobs["optim"])
        restore_rng_state(blobs["rng"])
        self.sample_generator.set_state(blobs["generators"]["sample"])
        self.shuffle_generator.set_state(blobs["generators"]["shuffle"])
        self.batches.load_state_dict(state["data"])
        self.iteration = int(state["step"])
        log.info("resumed from %s at iteration %d", path, self.iteration)
        return True


def _device(config: GRPOConfig) -> torch.device:
    if config.run.device is not None:
        return torch.device(config.run.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cold_start(
    model: GPT,
    tokenizer,
    examples,
    *,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    max_prompt_len: int = 48,
    max_len: int = 112,
) -> list[float]:
    """SFT warm-up on formatted answers (DeepSeek-R1's "cold start") so the policy emits the format
    sometimes and GRPO has a signal. Trains the *base* weights (adapters off, then a no-op adapter again),
    so a KL reference (adapters off) is the warmed-up model. Returns the per-step losses."""
    if steps < 1:
        raise ValueError(f"cold_start: steps must be >= 1, got {steps}")
    device = model.transformer.wte.weight.device
    batches = ResumableBatches(
        SFTDataset(examples, tokenizer, max_prompt_len, max_len),
        batch_size,
        SFTCollator(tokenizer),
        seed=seed,
    )
    adapters = adapter_names(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if adapters:
        set_adapter(model, None)
    base = [p for n, p in model.named_parameters() if ".lora_A." not in n and ".lora_B." not in n]
    for p in base:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(base, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        b = {k: v.to(device) for k, v in next(batches).items()}
        loss = response_nll(model(b["input_ids"], b["attention_mask"]), b["input_ids"], b["loss_mask"])
        loss = loss / b["loss_mask"][:, 1:].sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    for p in frozen:
        p.requires_grad_(False)
    if adapters:
        set_adapter(model, "policy" if "policy" in adapters else adapters[0])
    return losses


def build_grpo_trainer(config: GRPOConfig) -> GRPOTrainer:
    """Everything a GRPO run needs, from its config: policy (+ adapter `policy` in LoRA mode), prompts,
    the reward function or reward model, and (optionally) a cold-start SFT warm-up on the task."""
    from rlhf_fast.data import arithmetic_split, load_preference_splits

    model, tokenizer = build_model(config, adapter="policy")
    device, t, d = _device(config), config.task, config.data
    model.to(device)
    if t.reward_model is not None:
        reward_fn = load_reward_model_scorer(
            t.reward_model,
            tokenizer,
            model.config.vocab_size,
            device,
            attn_backend=config.model.attn_backend,
            kernel_backend=config.model.kernel_backend,
        )
        train, held_out, _ = load_preference_splits(
            d.data,
            subset=d.subset,
            eval_size=d.eval_size,
            synthetic_size=d.synthetic_size,
            seed=config.run.seed,
            skip_bad_examples=d.skip_bad_examples,
        )
        train_prompts = list(dict.fromkeys(ex.prompt for ex in train))
        eval_prompts = list(dict.fromkeys(ex.prompt for ex in held_out))
    else:
        problems, held_out = arithmetic_split(config.grpo.eval_prompts, config.run.seed, t.max_operand, t.ops)
        train_prompts, eval_prompts = [p.prompt for p in problems], [p.prompt for p in held_out]
        reward_fn = reward_function(t.reward)
        if t.cold_start_steps:
            _cold_start_once(config, model, tokenizer, [p.to_sft() for p in problems])
    return GRPOTrainer(config, model, tokenizer, train_prompts, eval_prompts, reward_fn)


def _cold_start_once(config: GRPOConfig, model: GPT, tokenizer, examples) -> None:
    """Cold start, saved in the run directory, so a resumed run reloads the very same warmed-up base."""
    path = Path(config.run.output_dir) / COLD_START_FILE
    if config.run.resume and path.is_file():
        model.load_state_dict(
            torch.load(path, map_location=model.transformer.wte.weight.device, weights_only=True)
        )
        log.info("cold start: loaded %s", path)
        return
    t = config.task
    losses = cold_start(
        model,
        tokenizer,
        examples,
        steps=t.cold_start_steps,
        lr=t.cold_start_lr,
        batch_size=16,
        seed=config.run.seed,
        max_prompt_len=config.data.max_prompt_len,
        max_len=config.data.max_len,
    )
    log.info("cold start: %d SFT steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)  # atomic: a crash mid-save never leaves a half-written cold start
