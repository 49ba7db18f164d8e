"""The one RL loop under PPO, GRPO and the critic-free family (RLOO, REINFORCE++, Dr. GRPO, DAPO options).

Each iteration: rollout (sample `group_size` responses per prompt and score them; with
`dynamic_sampling`, drop groups without score spread and sample more prompts), the training passes and
advantages (`ExperienceMaker`), then `epochs` passes of minibatch optimizer steps (`rl_update.py`).

The loop owns iteration cadence, evaluation, the collective checkpoint protocol (sharded strategies too), KV
cache release, peak memory, phase timing and precision (the strategy's autocast); algorithms
(`ppo.py`, `grpo.py`) bring their config, models and scorer. Checkpoints (trainable weights, optimizer,
KL coefficient, RNG and generator states, prompt order, iteration) resume exactly.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from rlhf_fast.distributed import Strategy
from rlhf_fast.generation import release_kv_caches
from rlhf_fast.rl import make_kl_controller

from .builders import export_model, export_peft_adapter, train_strategy
from .checkpoint import CheckpointManager, restore_collective, resume_or_start, save_collective
from .compiling import RunCompiler
from .curves import RL_PANELS, write_curves
from .experience import ExperienceMaker, PhaseTimer, Rollout, peak_memory_gb
from .loop import TrainModule, adamw, lr_lambda
from .memory_plan import check_trainer_memory
from .metrics import MetricsLogger, log
from .models import POLICY, PPOModels
from .reward_functions import eos_scored_models
from .rl_config import RLConfig
from .rl_update import PolicyUpdate


class RLTrainer(PolicyUpdate):
    """The loop over built objects: an RL config (PPOConfig, GRPOConfig), PPOModels, a tokenizer, resumable
    prompt batches, held-out prompts (texts or token ids; the first rl.eval_prompts are used), a scorer (None:
    the models' reward role) and a strategy (default: the config's, `train_strategy`)."""

    stage = "rl"

    def __init__(self, config: RLConfig, models: PPOModels, tokenizer, prompts, eval_prompts, scorer,
                 strategy: Strategy | None = None):
        strategy = strategy if strategy is not None else train_strategy(config)
        rl, run = config.rl, config.run
        self.config, self.rl, self.models, self.tokenizer = config, rl, models, tokenizer
        self.prompts, self.strategy, self.device = prompts, strategy, strategy.device
        if rl.critic != models.has_critic:
            raise ValueError(f"estimator {rl.estimator!r} {'needs' if rl.critic else 'takes no'} critic, but the "
                             f"models {'have none' if rl.critic else 'have one'}")
        keep = slice(-config.data.max_prompt_len, None)  # held-out prompt texts keep their last tokens
        eval_prompts = list(eval_prompts or [])[: rl.eval_prompts]
        self.eval_prompts = [tokenizer.encode(p)[keep] if isinstance(p, str) else list(p) for p in eval_prompts or []]
        self.eval_texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in eval_prompts or []]
        self._check_lengths(scorer)
        self._check_strategy()
        check_trainer_memory(self, scorer)  # CUDA: refuse a run whose memory plan does not fit
        self.run_dir = Path(run.output_dir)
        self.trainable = models.trainable_parameters()
        if not self.trainable:
            raise ValueError(f"{self.stage}: nothing to train (no parameter of the policy/critic requires grad)")
        self.actor, self.critic = self._prepare_models()
        self.compiler = RunCompiler(run, self.device, models, is_main=strategy.is_main)
        self.kl_ctl = make_kl_controller(rl.init_kl_coef, rl.kl_target, rl.kl_horizon_samples(strategy.world_size))
        self.maker = ExperienceMaker(
            models, max_new_tokens=rl.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, advantage=rl.advantage_config(config.model.kernel_backend),
            temperature=rl.temperature, kl_estimator=rl.kl_estimator, scorer=scorer,
            reference=rl.init_kl_coef > 0 or rl.kl_target is not None or rl.kl_loss_coef > 0,
            overlong_buffer=rl.overlong_buffer, overlong_penalty=rl.overlong_penalty,
            frozen_on_device=self.frozen_on_device,
            all_reduce=strategy.all_reduce_sum if strategy.world_size > 1 else None)
        # the fused kernel computes exactly this case; the weighted free functions every other one
        self.fused = rl.loss_aggregation == "token_mean" and rl.clip_eps_high in (None, rl.clip_eps)
        # Own generators: rollouts and minibatch order are reproducible and saved with checkpoints.
        self.rollout_gen = torch.Generator(self.device).manual_seed(run.seed)
        self.shuffle_gen = torch.Generator().manual_seed(run.seed + 1)
        self.checkpoints = CheckpointManager(self.run_dir, run.keep_last)
        self.logger = MetricsLogger(self.run_dir, enabled=strategy.is_main, report_to=run.report_to,
                                    config=config.to_dict())
        self.iteration = 0
        self._warned_short_batch = False
        # a task's own rule (RewardFunction of prompt texts and completions) measured at every evaluation as
        # eval/gold and eval/greedy_gold: a held-out measure, never a training signal (the demo sets it)
        self.gold = None
        self.history: list[dict] = []  # per-iteration metrics of this process
        self.eval_history: list[dict] = []

    # --- set-up -------------------------------------------------------------------------------------
    def _check_lengths(self, scorer) -> None:
        """The longest prompt + --max-new-tokens fits the policy; one more (the EOS appended to a truncated
        response before it is scored) fits every model that scores tokens."""
        items = getattr(getattr(self.prompts, "dataset", None), "items", [])  # a PromptDataset's prompts
        longest = max([len(it["prompt_ids"]) for it in items]
                      + [len(p) for p in self.eval_prompts] + [0])
        m = self.models
        scoring = eos_scored_models(scorer) if scorer is not None else \
            [m.reward_model or m.policy] * (m.reward_head is not None)  # the models' reward role
        for model, extra, what in [(m.policy, 0, "the policy's")] + [(s, 1, "the scoring model's")
                                                                     for s in scoring]:
            n_positions = model.config.n_positions
            if longest + self.rl.max_new_tokens + extra > n_positions:
                eos = " + 1 (the EOS appended to a truncated response for scoring)" if extra else ""
                raise ValueError(f"prompts of up to {longest} tokens (--max-prompt-len) + --max-new-tokens "
                                 f"{self.rl.max_new_tokens}{eos} exceed {what} n_positions={n_positions}: lower one")

    def _check_strategy(self) -> None:
        s, minibatch = self.strategy, self.rl.mini_batch_size
        if s.partitions_parameters:
            raise ValueError("RL supports ZeRO stages 0-2 only: rollouts run the actor outside its engine (KV-cache "
                             "generation), which ZeRO-3's partitioned weights do not allow")
        layout = s.batch_layout  # None: the strategy follows the loop's own minibatch steps
        if layout is not None and (layout != (minibatch, 1) or self.rl.micro_rows != minibatch):
            raise ValueError(f"the strategy's batch layout (micro {layout.micro_batch_size} x accumulation "
                             f"{layout.grad_accum_steps}) must be one step per minibatch (micro {minibatch} x 1, "
                             "micro_batch_size unset): build it with build_strategy(..., "
                             "micro_batch_size=mini_batch_size, grad_accum_steps=1)")

    def _prepare_models(self):
        """(actor, critic): the prepared training modules (one and the same unless full-parameter training under
        a strategy with an engine per model)."""
        m, o = self.models, self.config.optim

        def optimizer(params):
            return adamw(params, o.lr, o.weight_decay, o.betas)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o))

        frozen = [f for f in (m.reference, m.reward_model) if f is not None]
        if not self.strategy.engine_per_model or m.lora:
            # One optimizer over every trainable parameter (LoRA: the adapters share one frozen base).
            opt = optimizer(list(self.trainable.values()))
            engine, self.optimizer, self.scheduler = self.strategy.prepare(TrainModule(m), opt, scheduler(opt))
            self.modules = [engine]
            critic = engine
        else:
            opt = optimizer(list(m.policy.parameters()))
            engine, actor_opt, self.scheduler = self.strategy.prepare(TrainModule(m.policy), opt, scheduler(opt))
            self.modules, self.optimizer, critic = [engine], actor_opt, None
            if m.has_critic:
                params = list(m.critic.parameters()) + list(m.value_head.parameters())
                critic, _, _ = self.strategy.prepare(TrainModule(m.critic, m.value_head), optimizer(params))
                self.modules.append(critic)
            if m.reward_head is not None:
                self.strategy.prepare_frozen(m.reward_head)  # a few hundred weights: stays on the device
            for f in frozen:
                self.strategy.prepare_frozen(f)
        for f in frozen:
            if self.rl.offload_frozen:
                f.to("cpu")
        return engine, critic

    def frozen_on_device(self, model):
        """Context for a pass of a separate frozen model (reference, reward model; None: nothing to place)."""
        if model is None:
            return contextlib.nullcontext()
        return self.strategy.on_device(model, offload=self.rl.offload_frozen)

    # --- the steps ------------------------------------------------------------------------------------
    def _next_prompts(self) -> dict:
        """This rank's prompts (ranks take turns through one batch order, as in the SFT/RM trainers)."""
        return [next(self.prompts) for _ in range(self.strategy.world_size)][self.strategy.rank]

    @torch.no_grad()
    def rollout(self):
        """(Experience, stats) of one iteration's prompts; with dynamic sampling, only groups with signal."""
        rl, timer = self.rl, PhaseTimer(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        parts, groups, rounds = [], 0, 0
        with self.strategy.autocast():
            while True:
                b = self._next_prompts()
                ids, mask = b["input_ids"].to(self.device), b["attention_mask"].to(self.device)
                sampled = self.maker.sample(ids, mask, b.get("prompts"), generator=self.rollout_gen, timer=timer)
                rounds += 1
                kept = self.maker.keep_groups_with_signal(sampled) if rl.dynamic_sampling else sampled
                parts.append(kept)
                groups += len(kept.truncated) // rl.group_size
                if not rl.dynamic_sampling or groups >= rl.rollout_batch_size or rounds >= rl.max_sampling_rounds:
                    break
            rollout = Rollout.cat([p for p in parts if len(p.truncated)] or [sampled], self.maker.pad)
            rollout = rollout.select(torch.arange(min(len(rollout.truncated), rl.rows), device=self.device))
            exp, stats = self.maker.experience(rollout, kl_coef=self.kl_ctl.value, mask_truncated=rl.mask_truncated,
                                               timer=timer)
        if rl.dynamic_sampling:
            stats["sampling_rounds"] = rounds
            stats["groups_trained"] = min(groups, rl.rollout_batch_size)
            if groups < rl.rollout_batch_size and not self._warned_short_batch:
                self._warned_short_batch = True  # once a run; metrics.jsonl's groups_trained has every iteration
                log.warning("dynamic sampling: only %d of %d groups had score spread after %d rounds "
                            "(--max-sampling-rounds); iteration %d trained on %s", groups, rl.rollout_batch_size,
                            rounds, self.iteration + 1, f"{groups} groups" if groups else "a batch without signal")
        if self.strategy.world_size > 1:  # every rank adapts the KL coefficient to the same global mean
            stats = {k: self.strategy.all_reduce_mean(v) for k, v in stats.items()}
        return exp, stats

    def step(self) -> dict[str, float]:
        """One iteration: rollout -> score -> advantages -> update."""
        kl_coef = self.kl_ctl.value
        exp, stats = self.rollout()
        timer = PhaseTimer(self.device)
        with timer("train"):
            train = self.update(exp)
        stats["peak_mem_iter_gb"] = peak_memory_gb(self.device)  # rollout + update (peak_mem_gb: the rollout)
        self.kl_ctl.update(stats["kl"], n_steps=len(exp) * self.strategy.world_size)
        return {**stats, **{f"train/{k}": v for k, v in train.items()}, **timer.times, "kl_coef": kl_coef,
                **self.compiler.step_metrics()}

    def evaluate(self, batch_size: int | None = None, seed: int = 1234) -> dict[str, float]:
        """`ExperienceMaker.evaluate` on the held-out prompts ({} when there are none); every rank evaluates
        all of them."""
        if not self.eval_prompts:
            return {}
        return self.maker.evaluate(self.tokenizer, self.eval_prompts, self.eval_texts,
                                   batch_size=batch_size or self.rl.rollout_batch_size,
                                   samples=self.rl.eval_samples, seed=seed, autocast=self.strategy.autocast,
                                   gold=self.gold)

    # --- the loop -------------------------------------------------------------------------------------
    def train(self, until_iteration: int | None = None) -> list[dict]:
        """Run to rl.iterations (or stop at `until_iteration`, saving a checkpoint there), then draw the run's
        curves.png from its metrics.jsonl. The metric sinks (TensorBoard, wandb) close however it ends."""
        try:
            self._train(until_iteration)
        finally:
            self.logger.close()
        if self.strategy.is_main:
            write_curves(self.run_dir, RL_PANELS, title=f"{self.stage}: {self.run_dir}", xlabel="iteration")
        return self.history

    def _train(self, until_iteration: int | None) -> None:
        run, total = self.config.run, self.rl.iterations
        stop = total if until_iteration is None else min(until_iteration, total)
        resumed = resume_or_start(self.resume, run, self.checkpoints)
        self.logger.truncate(self.iteration if resumed else -1)  # metrics of re-run (or abandoned) iterations go
        if self.strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.iteration, desc=self.stage,
                   disable=not (run.progress and self.strategy.is_main), dynamic_ncols=True)
        while self.iteration < stop:
            metrics = self.step()
            self.iteration += 1
            self.history.append(metrics)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.3f}",
                            gap=f"{metrics['gen_logprob_gap_max']:.1e}")
            if run.log_every and self.iteration % run.log_every == 0:
                # as `step` names them (score, kl, time/generate, train/loss, ...): already one vocabulary
                self.logger.log(self.iteration, metrics, prefix=None)
            if run.eval_every and self.iteration % run.eval_every == 0 and self.iteration < total:
                self.log_eval()
            if run.save_every and self.iteration % run.save_every == 0 and self.iteration < stop:
                self.save()
        bar.close()
        release_kv_caches(self.models.policy)
        if self.iteration >= total:
            self.log_eval()
        self.save()
        self.compiler.save()

    def log_eval(self) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            self.eval_history.append({"iteration": self.iteration, **metrics})
            self.logger.log(self.iteration, metrics, prefix="eval")
            if self.strategy.is_main:
                log.info("%s iteration %d eval: %s", self.stage, self.iteration,
                         ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    # --- checkpoints ----------------------------------------------------------------------------------
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
            return False
        path, blobs, state = loaded
        restore_collective(self.strategy, self.checkpoints, self.trainable, blobs, int(state["step"]))
        self.rollout_gen.set_state(blobs["generators"]["rollout"])
        self.shuffle_gen.set_state(blobs["generators"]["shuffle"])
        self.prompts.load_state_dict(state["data"])
        self.kl_ctl.value = float(state["kl_coef"])
        self.iteration = int(state["step"])
        log.info("resumed %s from %s at iteration %d", self.stage, path, self.iteration)
        return True

    def export(self, directory) -> Path:
        """The policy as an HF GPT-2 directory (policy adapter merged in LoRA mode) that `--model` loads."""
        adapter = POLICY if self.models.lora else None
        directory = export_model(self.models.policy, self.tokenizer, directory, merge_adapter=adapter)
        export_peft_adapter(self.config, self.models.policy, adapter, self.tokenizer, directory)
        return directory
