"""The update half of the RL loop: the loss of one micro-batch and `epochs` of minibatch optimizer steps.

A minibatch is one optimizer step; its loss is a weighted sum over its tokens (`rl.loss_weights`: token
mean, sequence mean or Dr. GRPO's constant), so splitting it into micro-batch forwards changes nothing.
The fused `kernels.ppo_loss` (policy + clipped value + k3 KL in one pass) computes the token mean with a
symmetric clip; `rl.weighted_policy_loss` (+ `rl.value_loss`) every other option. The update runs without
dropout, as the rollout does, so the first ratio of every iteration is exactly 1.
"""

from __future__ import annotations

import math

import torch

from rlhf_fast.rl import loss_weights, masked_mean, ppo_loss, value_loss, weighted_policy_loss


def _first_action(action_mask: torch.Tensor) -> int:
    """The first action column of a batch (all rows share the prompt length P: it is P - 1)."""
    return int(action_mask.any(dim=0).to(torch.uint8).argmax())


class PolicyUpdate:
    """Mixed into `RLTrainer`, whose attributes it reads: rl, loop, models, strategy, actor, critic, modules
    (the prepared engines), fused, scheduler, shuffle_gen, device."""

    def _forward(self, exp, first: int):
        """(logprobs, entropy, values or None) of the training forward, through the engine(s)."""
        m, t = self.models, self.rl.temperature

        def actor_fn():
            return m.policy_logprobs(exp.sequences, exp.attention_mask, first, with_entropy=True, temperature=t)

        def critic_fn():
            return m.values(exp.sequences, exp.attention_mask, first) if m.has_critic else None

        if self.actor is self.critic or self.critic is None:
            return self.actor(lambda: (*actor_fn(), critic_fn()))
        logprobs, entropy = self.actor(actor_fn)
        return logprobs, entropy, self.critic(critic_fn)

    def loss(self, exp) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch of experience (as its own minibatch) and its (detached) metrics."""
        rl = self.rl
        weights = loss_weights(exp.action_mask, rl.loss_aggregation, max_new_tokens=rl.max_new_tokens)
        loss, metrics, _ = self.module_losses(exp, weights, torch.ones((), device=exp.action_mask.device))
        return loss, metrics

    def module_losses(self, exp, weights, token_share):
        """(loss, metrics, {module: loss}) of one micro-batch: `weights` are its rows of the minibatch's
        per-token loss weights, `token_share` its fraction of the minibatch's tokens. loss is the micro-batch's
        part of the minibatch loss; metrics are token means over the micro-batch. Two engines (actor,
        critic): the policy part for the actor and the value part for the critic."""
        rl, first = self.rl, _first_action(exp.action_mask)
        logprobs, entropy, values = self._forward(exp, first)
        critic = values is not None
        if not critic:
            values = torch.zeros_like(logprobs)
        vf = rl.vf_coef if critic else 0.0
        kw = dict(clip_eps=rl.clip_eps, value_clip_eps=rl.value_clip_eps, ref_logprobs=exp.ref_logprobs,
                  kl_coef=rl.kl_loss_coef, backend=self.config.model.kernel_backend)
        old = (exp.values if critic else values, exp.returns, exp.action_mask)
        if self.fused:
            two_engines = self.critic is not None and self.critic is not self.actor
            # two engines: the policy side with the values detached (the same loss value) and the value side
            # with the log-probs detached, whose gradients are those of the one summed loss
            loss, metrics = ppo_loss(logprobs, exp.logprobs, exp.advantages, values.detach() if two_engines else values,
                                     *old, vf_coef=vf, **kw)
            loss = policy_part = loss * token_share
            value_part = None
            if two_engines:
                value_part, _ = ppo_loss(logprobs.detach(), exp.logprobs, exp.advantages, values, *old, vf_coef=vf,
                                         **kw)
                value_part = value_part * token_share
        else:
            policy_part, metrics = weighted_policy_loss(
                logprobs, exp.logprobs, exp.advantages, exp.action_mask, weights, clip_low=rl.clip_eps,
                clip_high=rl.clip_eps_high, ref_logprobs=exp.ref_logprobs, kl_coef=rl.kl_loss_coef)
            metrics["policy_loss"] = metrics["policy_loss"] / weights.sum().clamp(min=1e-12)
            metrics["kl"] = metrics["kl"] / weights.sum().clamp(min=1e-12)
            value_part = torch.zeros((), device=logprobs.device)
            if critic:
                v, _ = value_loss(values, *old, clip_eps=rl.value_clip_eps)
                value_part, metrics["value_loss"] = vf * v * token_share, v.detach()
            loss = policy_part + value_part
        if self.critic is not None and self.critic is not self.actor:
            per_module = {self.actor: policy_part, self.critic: value_part}
        else:
            per_module = {self.actor: loss}
        if not critic:
            metrics.pop("value_loss", None)
        metrics["entropy"] = masked_mean(entropy.detach(), exp.action_mask)
        return loss, metrics, per_module

    def _loss_units(self, mini) -> torch.Tensor:
        """What the minibatch loss is a mean over: tokens (token_mean), rows with a token (seq_mean), rows."""
        aggregation, mask = self.rl.loss_aggregation, mini.action_mask
        if aggregation == "token_mean":
            return mask.sum()
        return mask.any(dim=1).sum() if aggregation == "seq_mean" else torch.tensor(mask.shape[0])

    def update(self, exp) -> dict[str, float]:
        """`epochs` passes over shuffled minibatches; the mean of each metric over the optimizer steps."""
        rl, B = self.rl, len(exp)
        self.models.eval()  # no dropout, as in the rollout: the first ratio is exactly 1
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(rl.epochs):
            order = torch.randperm(B, generator=self.shuffle_gen).to(self.device)
            for i in range(0, B, rl.mini_batch_size):
                mini = exp.select(order[i: i + rl.mini_batch_size])
                weights = loss_weights(mini.action_mask, rl.loss_aggregation, max_new_tokens=rl.max_new_tokens)
                n_tokens = mini.action_mask.sum()
                rank_share = 1.0
                if self.strategy.world_size > 1:  # this rank's part of the global minibatch
                    units = self._loss_units(mini).float()
                    rank_share = units / self.strategy.all_reduce_sum(units).clamp(min=1)
                totals: dict[str, float] = {}
                for j in range(0, len(mini), rl.micro_rows):
                    micro = mini.select(slice(j, j + rl.micro_rows))
                    share = micro.action_mask.sum() / n_tokens.clamp(min=1)
                    with self.strategy.autocast():
                        loss, metrics, per_module = self.module_losses(micro, weights[j: j + rl.micro_rows], share)
                    for module, module_loss in per_module.items():
                        self.strategy.backward(module_loss * rank_share, model=module)
                    totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
                    for k, v in metrics.items():
                        totals[k] = totals.get(k, 0.0) + float(v) * float(share)
                # the norm over all trainable parameters (each engine clips its own)
                totals["grad_norm"] = math.sqrt(sum(self.strategy.step(model=module) ** 2 for module in self.modules))
                for k, v in totals.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        means = {k: v / steps for k, v in sums.items()}
        if self.scheduler is not None:
            means["lr"] = self.scheduler.get_last_lr()[0]
        if self.strategy.world_size > 1:
            means = {k: self.strategy.all_reduce_mean(v) for k, v in means.items()}
        return means
