"""PPO (Ouyang et al. 2022 / Ziegler et al. 2019 recipe): a short loop over named steps.

Each iteration: rollout + score + advantages (`ExperienceMaker.make`), then `ppo_epochs` passes over
shuffled minibatches of that experience with the fused `kernels.ppo_loss` (policy + clipped value
loss), gradient clipping, and a fixed or adaptive KL coefficient for the per-token reward penalty.
Every iteration logs the gap between generation-time and training-time log-probs of the same tokens
(same weights, so it must stay ~1e-5 in fp32; a growing gap is a bug).

Strategies: `SingleDeviceStrategy` (one optimizer over every trainable parameter) or `DeepSpeedStrategy`
(ZeRO 0-2). Under DeepSpeed, full-parameter PPO makes the actor (policy) and the critic (critic + value head)
two engines, each with its own optimizer, gradient clipping and checkpoint, and the frozen reference and
reward model go through `prepare_frozen`; LoRA PPO is one engine over all the adapters and heads (they share
the frozen base). Training forwards run through the engines; rollouts call the models directly.

Checkpoints (adapters/heads or full weights, optimizer, KL coefficient, RNG and generator states,
prompt order, iteration) resume exactly: a run split by a restart takes the very same steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast.data import PromptCollator, PromptDataset, ResumableBatches, load_preference_splits, load_tokenizer
from rlhf_fast.distributed import PRECISIONS, DeepSpeedSettings, DeepSpeedStrategy, SingleDeviceStrategy, Strategy
from rlhf_fast.generation import generate, release_kv_caches
from rlhf_fast.model import GPT, ScalarHead, add_lora, load_adapter
from rlhf_fast.rl import AdvantageConfig, kl_k1, make_kl_controller, masked_mean, ppo_loss
from rlhf_fast.rl.kl import KL_ESTIMATORS

from .checkpoint import CheckpointManager
from .common import TOKENIZER_MARKER, TrainModule, restore_collective, save_collective
from .experience import POLICY, REWARD, VALUE, ExperienceMaker, PhaseTimer, PPOModels
from .metrics import MetricsLogger, log
from .reward import REWARD_ADAPTER_FILE, REWARD_META_FILE, load_reward_model, weights_fingerprint


@dataclass(frozen=True)
class PPOConfig:
    iterations: int = 40  # rollout + update rounds
    rollout_batch_size: int = 32  # prompts per rollout (one response each)
    mini_batch_size: int = 8  # sequences per optimizer step
    ppo_epochs: int = 2  # passes over each rollout
    max_new_tokens: int = 48
    temperature: float = 1.0  # rollout sampling; log-probs are always those of temperature 1
    top_k: int = 0
    top_p: float = 1.0
    lr: float = 5e-4  # LoRA adapters; ~1e-6..1e-5 for full-parameter PPO of gpt2 sizes
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.5
    init_kl_coef: float = 0.05
    kl_target: float | None = None  # None: fixed KL coefficient; else adaptive (Ziegler et al. 2019)
    kl_horizon: int = 10000
    offload_frozen: bool = False  # move the separate reference / reward model to the CPU between uses
    kl_estimator: str = "k1"  # per-token KL penalty in the shaped rewards
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    loss_backend: str = "auto"  # kernels backend for gae and ppo_loss
    precision: str = "fp32"
    device: str | None = None  # None: cuda when available
    seed: int = 0
    output_dir: str = "runs/ppo"
    log_every: int = 1
    eval_every: int = 0  # iterations between held-out evaluations (0: only at the end)
    save_every: int = 0  # iterations between checkpoints (0: only at the end)
    keep_last: int = 2
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("iterations", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                     "kl_horizon", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        if self.mini_batch_size > self.rollout_batch_size:
            raise ValueError(f"ppo.mini_batch_size ({self.mini_batch_size}) exceeds rollout_batch_size "
                             f"({self.rollout_batch_size})")
        if self.lr <= 0 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("ppo: need lr > 0, temperature > 0, 0 < top_p <= 1, top_k >= 0")
        if min(self.clip_eps, self.value_clip_eps, self.vf_coef, self.init_kl_coef) < 0:
            raise ValueError("ppo: clip_eps, value_clip_eps, vf_coef and init_kl_coef must be >= 0")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"ppo.kl_target must be > 0 or None, got {self.kl_target}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"ppo.kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"ppo.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if min(self.log_every, self.eval_every, self.save_every) < 0:
            raise ValueError("ppo.log_every / eval_every / save_every must be >= 0")
        AdvantageConfig(gamma=self.gamma, lam=self.lam)  # validates gamma / lam

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_ppo_strategy(config: PPOConfig, strategy: str = "single",
                       deepspeed: DeepSpeedSettings | None = None) -> Strategy:
    """The strategy `PPOTrainer` runs under: 'single' (config.device) or 'deepspeed' (device from its
    launcher; one optimizer step per minibatch, so micro-batch = mini_batch_size and no accumulation)."""
    if strategy == "single":
        if deepspeed is not None:
            raise ValueError("DeepSpeed settings (--zero-stage, --offload-*, --deepspeed-config) need "
                             "--strategy deepspeed")
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return SingleDeviceStrategy(device, config.precision, config.max_grad_norm)
    if strategy != "deepspeed":
        raise ValueError(f"strategy must be 'single' or 'deepspeed', got {strategy!r}")
    return DeepSpeedStrategy(deepspeed or DeepSpeedSettings(), config.precision, config.max_grad_norm,
                             micro_batch_size=config.mini_batch_size, grad_accum_steps=1)


def _adamw(params: list, config: PPOConfig) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))


def _first_action(action_mask: torch.Tensor) -> int:
    """The first action column of a batch (all rows share the prompt length P: it is P - 1)."""
    return int(action_mask.any(dim=0).to(torch.uint8).argmax())


class PPOTrainer:
    """PPO over built objects: PPOModels, a tokenizer, resumable prompt batches, held-out prompt ids, and
    optionally a strategy (`build_ppo_strategy`; default: one device, `config.device`)."""

    stage = "ppo"

    def __init__(self, config: PPOConfig, models: PPOModels, tokenizer, prompts: ResumableBatches,
                 eval_prompts: list[list[int]] | None = None, strategy: Strategy | None = None):
        self.config, self.models, self.tokenizer, self.prompts = config, models, tokenizer, prompts
        self.eval_prompts = eval_prompts or []
        c = config
        self.strategy = strategy if strategy is not None else build_ppo_strategy(c)
        self._check_strategy()
        self.device = self.strategy.device
        self.run_dir = Path(c.output_dir)
        self.trainable = models.trainable_parameters()
        if not self.trainable:
            raise ValueError("PPO: nothing to train (no parameter of the policy/critic requires grad)")
        self.actor, self.critic = self._prepare_models()
        self.kl_ctl = make_kl_controller(c.init_kl_coef, c.kl_target, c.kl_horizon)
        advantage = AdvantageConfig(estimator="gae", gamma=c.gamma, lam=c.lam, whiten=c.whiten_advantages,
                                    backend=c.loss_backend)
        self.maker = ExperienceMaker(models, max_new_tokens=c.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, advantage=advantage,
                                     temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                     kl_estimator=c.kl_estimator, frozen_on_device=self.frozen_on_device)
        # Own generators: rollouts and minibatch order are reproducible and saved with checkpoints.
        self.rollout_gen = torch.Generator(self.device).manual_seed(c.seed)
        self.shuffle_gen = torch.Generator().manual_seed(c.seed + 1)
        self.checkpoints = CheckpointManager(self.run_dir, c.keep_last)
        self.logger = MetricsLogger(self.run_dir, enabled=self.strategy.is_main)
        self.iteration = 0
        self.history: list[dict] = []  # per-iteration metrics of this process
        self.eval_history: list[dict] = []

    def _check_strategy(self) -> None:
        c, s = self.config, self.strategy
        if s.precision != c.precision:
            raise ValueError(f"ppo.precision={c.precision!r} but the strategy runs {s.precision!r}")
        if c.device is not None and torch.device(c.device).type != s.device.type:
            raise ValueError(f"ppo.device={c.device!r}, but the strategy's device is {s.device}: drop --device "
                             "(under DeepSpeed set DS_ACCELERATOR=cpu to force the CPU)")
        if isinstance(s, DeepSpeedStrategy):
            if int(s.ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
                raise ValueError("PPO under DeepSpeed supports ZeRO stages 0-2: rollouts run the actor outside its "
                                 "engine (KV-cache generation), which ZeRO-3's partitioned weights do not allow")
            if (s.micro_batch_size, s.grad_accum_steps) != (c.mini_batch_size, 1):
                raise ValueError(f"the DeepSpeed strategy's batch layout (micro {s.micro_batch_size} x accumulation "
                                 f"{s.grad_accum_steps}) must be PPO's one step per minibatch (micro "
                                 f"{c.mini_batch_size} x 1): build it with build_ppo_strategy")

    def _prepare_models(self):
        """(actor, critic): the prepared training modules (one and the same unless DeepSpeed full-parameter)."""
        m, c = self.models, self.config
        if not isinstance(self.strategy, DeepSpeedStrategy) or m.lora:
            # One optimizer over every trainable parameter (LoRA: the adapters share one frozen base).
            module = TrainModule(m)
            engine, self.optimizer, _ = self.strategy.prepare(module, _adamw(list(self.trainable.values()), c))
            self.optimizers = [self.optimizer]
            for frozen in (m.reference, m.reward_model):
                if frozen is not None and c.offload_frozen:
                    frozen.to("cpu")
            return engine, engine
        actor, actor_opt, _ = self.strategy.prepare(TrainModule(m.policy), _adamw(list(m.policy.parameters()), c))
        critic_params = list(m.critic.parameters()) + list(m.value_head.parameters())
        critic, critic_opt, _ = self.strategy.prepare(TrainModule(m.critic, m.value_head), _adamw(critic_params, c))
        self.optimizers, self.optimizer = [actor_opt, critic_opt], None  # no single optimizer here
        self.strategy.prepare_frozen(m.reward_head)  # a few hundred weights: stays on the device
        for frozen in (m.reference, m.reward_model):
            if frozen is not None:
                self.strategy.prepare_frozen(frozen)
                if c.offload_frozen:
                    frozen.to("cpu")
        return actor, critic

    def frozen_on_device(self, model):
        """Context for a pass of a separate frozen model (reference, reward model; None: nothing to place)."""
        if model is None:
            return contextlib.nullcontext()
        return self.strategy.on_device(model, offload=self.config.offload_frozen)

    # --- the steps ------------------------------------------------------------------------------
    def rollout(self):
        """This rank's prompts (ranks take turns through one batch order, as in the SFT/RM trainers)."""
        batch = [next(self.prompts) for _ in range(self.strategy.world_size)][self.strategy.rank]
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        with self.strategy.autocast():
            exp, stats = self.maker.make(ids, mask, kl_coef=self.kl_ctl.value, generator=self.rollout_gen)
        if self.strategy.world_size > 1:  # every rank adapts the KL coefficient to the same global mean
            stats = {k: self.strategy.all_reduce_mean(v) for k, v in stats.items()}
        return exp, stats

    def _forward(self, exp, first: int):
        """(logprobs, entropy, values) of the training forward, through the engine(s)."""
        m = self.models

        def actor_fn():
            return m.policy_logprobs(exp.sequences, exp.attention_mask, first, with_entropy=True)

        def critic_fn():
            return m.values(exp.sequences, exp.attention_mask, first)

        if self.actor is self.critic:
            return self.actor(lambda: (*actor_fn(), critic_fn()))
        logprobs, entropy = self.actor(actor_fn)
        return logprobs, entropy, self.critic(critic_fn)

    def loss(self, exp) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PPO loss of one minibatch of experience and its (detached) metrics."""
        loss, metrics, _ = self.module_losses(exp)
        return loss, metrics

    def module_losses(self, exp) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        """`loss(exp)`, plus the loss each prepared module backpropagates. Two engines (actor, critic): the
        policy loss for the actor and the value loss for the critic, as two ppo_loss calls with the other
        side detached, which are the gradients of the one summed loss."""
        first = _first_action(exp.action_mask)
        logprobs, entropy, values = self._forward(exp, first)
        c = self.config
        kw = dict(clip_eps=c.clip_eps, value_clip_eps=c.value_clip_eps, vf_coef=c.vf_coef,
                  ref_logprobs=exp.ref_logprobs, backend=c.loss_backend)
        old = (exp.advantages, values, exp.values, exp.returns, exp.action_mask)
        if self.actor is self.critic:
            loss, metrics = ppo_loss(logprobs, exp.logprobs, *old, **kw)
            per_module = {self.actor: loss}
        else:
            loss, metrics = ppo_loss(logprobs, exp.logprobs, exp.advantages, values.detach(), *old[2:], **kw)
            critic_loss, _ = ppo_loss(logprobs.detach(), exp.logprobs, *old, **kw)
            per_module = {self.actor: loss, self.critic: critic_loss}
        if self.strategy.world_size > 1:  # each rank's token-mean -> its share of the global token-mean
            n = exp.action_mask.sum()
            share = n / self.strategy.all_reduce_sum(n.float()).clamp(min=1)
            per_module = {k: v * share for k, v in per_module.items()}
        metrics["entropy"] = masked_mean(entropy.detach(), exp.action_mask)
        return loss, metrics, per_module

    def update(self, exp) -> dict[str, float]:
        """ppo_epochs passes over shuffled minibatches; the mean of each metric over the steps."""
        self.models.train()
        c, B = self.config, len(exp)
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(c.ppo_epochs):
            order = torch.randperm(B, generator=self.shuffle_gen).to(self.device)
            for i in range(0, B, c.mini_batch_size):
                with self.strategy.autocast():
                    loss, metrics, per_module = self.module_losses(exp.select(order[i: i + c.mini_batch_size]))
                for module, module_loss in per_module.items():
                    self.strategy.backward(module_loss, model=module)
                # the norm over all trainable parameters (each engine clips its own)
                grad_norm = math.sqrt(sum(self.strategy.step(model=module) ** 2 for module in per_module))
                metrics = {"loss": loss.detach(), **metrics, "grad_norm": grad_norm}
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                steps += 1
        means = {k: v / steps for k, v in sums.items()}
        if self.strategy.world_size > 1:
            means = {k: self.strategy.all_reduce_mean(v) for k, v in means.items()}
        return means

    def step(self) -> dict[str, float]:
        """One iteration: rollout -> score -> advantages -> update."""
        kl_coef = self.kl_ctl.value
        exp, stats = self.rollout()
        timer = PhaseTimer(self.device)
        with timer("train"):
            train = self.update(exp)
        self.kl_ctl.update(stats["kl"], n_steps=len(exp) * self.strategy.world_size)
        return {**stats, **{f"train/{k}": v for k, v in train.items()}, **timer.times, "kl_coef": kl_coef}

    @torch.no_grad()
    def evaluate(self, batch_size: int | None = None, seed: int = 1234) -> dict[str, float]:
        """Mean reward-model score and KL to the reference (summed k1 per sequence) of sampled responses
        to the held-out prompts. A fixed-seed generator of its own: training RNG is untouched. Every rank
        evaluates all the held-out prompts (the same numbers)."""
        if not self.eval_prompts:
            return {}
        self.models.eval()
        bs = batch_size or self.config.rollout_batch_size
        gen = torch.Generator(self.device).manual_seed(seed)
        scores, kls, lengths = [], [], []
        for i in range(0, len(self.eval_prompts), bs):
            ids, mask = self.tokenizer.pad(self.eval_prompts[i: i + bs], side="left")
            ids, mask = ids.to(self.device), mask.to(self.device)
            with self.strategy.autocast(), self.models.acting() as policy:
                out = generate(policy, ids, mask, generator=gen, **self.maker.generation)
            first, seq, amask = ids.shape[1] - 1, out.sequences, out.attention_mask.bool()
            with self.strategy.autocast():
                lp = self.models.policy_logprobs(seq, amask, first)[:, first:]
                with self.frozen_on_device(self.models.reference):
                    ref = self.models.ref_logprobs(seq, amask, first)[:, first:]
                with self.frozen_on_device(self.models.reward_model):
                    scores.append(self.models.scores(seq, amask).float())
            resp = out.response_mask.bool()
            kls.append(torch.where(resp, kl_k1(lp.float(), ref.float()), 0.0).sum(dim=1))
            lengths.append(resp.sum(dim=1).float())
        return {"reward": float(torch.cat(scores).mean()), "reward_std": float(torch.cat(scores).std()),
                "kl": float(torch.cat(kls).mean()), "response_len": float(torch.cat(lengths).mean())}

    def train(self, until_iteration: int | None = None) -> list[dict]:
        """Run to config.iterations (or stop at `until_iteration`, saving a checkpoint there)."""
        c = self.config
        stop = c.iterations if until_iteration is None else min(until_iteration, c.iterations)
        if self.strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "ppo_config.json").write_text(json.dumps(c.to_dict(), indent=1))
        if c.resume:
            self.resume()
        from tqdm.auto import tqdm

        bar = tqdm(total=c.iterations, initial=self.iteration, desc="ppo",
                   disable=not (c.progress and self.strategy.is_main), dynamic_ncols=True)
        while self.iteration < stop:
            metrics = self.step()
            self.iteration += 1
            self.history.append(metrics)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.3f}",
                            gap=f"{metrics['gen_logprob_gap_max']:.1e}")
            if c.log_every and self.iteration % c.log_every == 0:
                self.logger.log(self.iteration, metrics)
            if c.eval_every and self.iteration % c.eval_every == 0 and self.iteration < c.iterations:
                self.log_eval()
            if c.save_every and self.iteration % c.save_every == 0 and self.iteration < stop:
                self.save()
        bar.close()
        release_kv_caches(self.models.policy)
        if self.iteration >= c.iterations:
            self.log_eval()
        self.save()
        self.logger.close()
        return self.history

    def log_eval(self) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            self.eval_history.append({"iteration": self.iteration, **metrics})
            self.logger.log(self.iteration, metrics, prefix="eval")
            if self.strategy.is_main:
                log.info("ppo iteration %d eval: %s", self.iteration,
                         ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Collective: every process calls it (see `save_collective`)."""
        generators = {"rollout": self.rollout_gen.get_state(), "shuffle": self.shuffle_gen.get_state()}
        path = save_collective(self.strategy, self.checkpoints, self.iteration, self.trainable,
                               {"generators": generators},
                               {"stage": self.stage, "data": self.prompts.state_dict(), "kl_coef": self.kl_ctl.value})
        if path is not None:
            self.logger.event(self.iteration, checkpoint=str(path))
        return path

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint of the run directory; False when there is none."""
        loaded = self.checkpoints.load_latest(self.stage, self.trainable)
        if loaded is None:
            log.info("no checkpoint in %s: PPO starts at iteration 0", self.checkpoints.dir)
            return False
        path, blobs, state = loaded
        restore_collective(self.strategy, self.checkpoints, self.trainable, blobs, int(state["step"]))
        self.rollout_gen.set_state(blobs["generators"]["rollout"])
        self.shuffle_gen.set_state(blobs["generators"]["shuffle"])
        self.prompts.load_state_dict(state["data"])
        self.kl_ctl.value = float(state["kl_coef"])
        self.iteration = int(state["step"])
        log.info("resumed PPO from %s at iteration %d", path, self.iteration)
        return True

    def export(self, directory) -> Path:
        """The policy as an HF GPT-2 directory (policy adapter merged in LoRA mode)."""
        directory = Path(directory)
        self.models.policy.save_pretrained(directory, merge_adapter=POLICY if self.models.lora else None)
        return directory


# --- builders: PPO models from the SFT and RM exports --------------------------------------------


def export_tokenizer_name(directory: Path) -> str:
    marker = directory / TOKENIZER_MARKER
    return json.loads(marker.read_text())["tokenizer"] if marker.is_file() else str(directory)


def tokenizer_signature(tokenizer) -> str:
    """A digest of the token -> id mapping (what must agree between policy and reward model)."""
    if hasattr(tokenizer, "tok"):
        items = sorted(tokenizer.tok.get_vocab().items())
    else:
        items = [("byte", tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)]
    return hashlib.sha256(repr(items).encode()).hexdigest()


def _existing_dir(path, what: str, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} (give the export directory of the "
                                f"previous stage with {flag})")
    return p


def load_ppo_models(sft_model, reward_model, *, lora: bool = True, lora_rank: int = 8, lora_alpha: float = 16.0,
                    attn_backend: str = "auto", kernel_backend: str = "auto", seed: int = 0):
    """(PPOModels, tokenizer) from an SFT export (`rlhf-fast sft`) and an RM export (`rlhf-fast rm`).

    LoRA mode: the SFT model is the one frozen base with adapters `policy` and `value`; when the RM was
    trained as a LoRA adapter on this very base (its export holds the adapter and the base's weight
    fingerprint) the `reward` adapter joins them, else the merged RM is kept as a separate frozen model.
    Full mode: trained policy, separate critic and frozen reference, all from the SFT weights.
    """
    sft_dir = _existing_dir(sft_model, "SFT model directory", "--sft-model")
    rm_dir = _existing_dir(reward_model, "reward model directory", "--reward-model")
    tokenizer = load_tokenizer(export_tokenizer_name(sft_dir))
    rm_tokenizer = load_tokenizer(export_tokenizer_name(rm_dir))
    if tokenizer_signature(tokenizer) != tokenizer_signature(rm_tokenizer):
        raise ValueError(f"the reward model {rm_dir} was trained with a different tokenizer "
                         f"({export_tokenizer_name(rm_dir)}, {rm_tokenizer.vocab_size} tokens) than the SFT "
                         f"policy {sft_dir} ({export_tokenizer_name(sft_dir)}, {tokenizer.vocab_size} tokens)")
    backends = dict(attn_backend=attn_backend, kernel_backend=kernel_backend)
    torch.manual_seed(seed)  # LoRA A matrices and the value head
    policy = GPT.from_pretrained(str(sft_dir), **backends)
    reward_model, reward_head = load_reward_model(rm_dir, **backends)
    if reward_model.config.vocab_size != policy.config.vocab_size:
        raise ValueError(f"the reward model {rm_dir} has vocab_size {reward_model.config.vocab_size}, the SFT "
                         f"policy {sft_dir} has {policy.config.vocab_size}: they need the same tokenizer")
    value_head = ScalarHead(policy.config.n_embd)
    if not lora:
        critic = GPT.from_pretrained(str(sft_dir), **backends)
        reference = GPT.from_pretrained(str(sft_dir), **backends)
        return PPOModels(policy, value_head, reward_head, critic=critic, reference=reference,
                         reward_model=reward_model), tokenizer
    meta_path = rm_dir / REWARD_META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    shared = (rm_dir / REWARD_ADAPTER_FILE).is_file() and meta.get("base_fingerprint") == weights_fingerprint(policy)
    add_lora(policy, POLICY, rank=lora_rank, alpha=lora_alpha)
    add_lora(policy, VALUE, rank=lora_rank, alpha=lora_alpha)
    if shared:
        load_adapter(policy, rm_dir / REWARD_ADAPTER_FILE, REWARD)
        reward_model = None  # one frozen base for all four roles
    else:
        log.info("%s was not trained as a LoRA adapter on %s: keeping it as a separate frozen model",
                 rm_dir, sft_dir)
    policy.set_adapter(POLICY)
    return PPOModels(policy, value_head, reward_head, reward_model=reward_model), tokenizer


def load_prompts(source: str, *, subset: str | None = None, eval_size: int = 128, synthetic_size: int = 4000,
                 seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: a .jsonl(.gz) file of {"prompt": ...} lines (its last `eval_size` held
    out), or the prompts of any preference source `load_preference_splits` reads (synthetic, HH-RLHF)."""
    path = Path(source)
    if path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz")):
        with (gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path)) as f:
            first = next((line for line in f if line.strip()), "{}")
        if "prompt" in json.loads(first) and "chosen" not in json.loads(first):
            return _prompt_file(path, eval_size)
    train, held_out, _ = load_preference_splits(source, subset=subset, eval_size=eval_size,
                                                synthetic_size=synthetic_size, seed=seed)
    return [ex.prompt for ex in train], [ex.prompt for ex in held_out]


def _prompt_file(path: Path, eval_size: int) -> tuple[list[str], list[str]]:
    prompts = []
    with gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'prompt'")
            prompts.append(record["prompt"])
    if len(prompts) <= eval_size:
        raise ValueError(f"{path}: {len(prompts)} prompts, need more than eval_size={eval_size}")
    return prompts[:-eval_size], prompts[-eval_size:]


def prompt_batches(prompts, tokenizer, batch_size: int, max_prompt_len: int, seed: int) -> ResumableBatches:
    return ResumableBatches(PromptDataset(prompts, tokenizer, max_prompt_len), batch_size, PromptCollator(tokenizer),
                            seed=seed)


