"""Pure tensor RL maths: advantages, losses, KL, reward shaping, experience dataclasses. torch only
(plus `rlhf_fast.kernels` for the fused GAE and PPO loss)."""

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    CRITIC_ESTIMATORS,
    GROUP_ESTIMATORS,
    AdvantageConfig,
    compute_advantages,
    register_advantage_estimator,
)
from .experience import Experience
from .kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimator,
    kl_k1,
    kl_k2,
    kl_k3,
    make_kl_controller,
)
from .losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    clipped_policy_loss,
    dual_clip_policy_loss,
    entropy_loss,
    loss_weights,
    pairwise_ranking_loss,
    policy_loss_fn,
    ppo_loss,
    register_policy_loss,
    value_loss,
    weighted_policy_loss,
)
from .masked import masked_count, masked_mean, masked_sum, masked_var, masked_whiten
from .preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    preference_loss_fn,
    preference_metrics,
    register_preference_loss,
)
from .rewards import groups_with_signal, last_token_index, overlong_penalty, shape_rewards

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "CRITIC_ESTIMATORS",
    "GROUP_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE",
    "AdaptiveKLController",
    "AdvantageConfig",
    "Experience",
    "FixedKLController",
    "clipped_policy_loss",
    "compute_advantages",
    "dual_clip_policy_loss",
    "entropy_loss",
    "groups_with_signal",
    "kl_estimator",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "last_token_index",
    "loss_weights",
    "make_kl_controller",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "pairwise_ranking_loss",
    "policy_loss_fn",
    "ppo_loss",
    "preference_loss_fn",
    "preference_metrics",
    "register_advantage_estimator",
    "register_policy_loss",
    "register_preference_loss",
    "shape_rewards",
    "value_loss",
    "weighted_policy_loss",
]
