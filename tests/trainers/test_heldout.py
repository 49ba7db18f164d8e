"""held_out_responses keeps, one by one, exactly the responses ExperienceMaker.evaluate averages."""

import pytest
from ppo_testing import tiny_models

from rlhf_fast.data import ByteTokenizer
from rlhf_fast.rl import AdvantageConfig
from rlhf_fast.trainers.experience import ExperienceMaker
from rlhf_fast.trainers.heldout import held_out_responses

TOK = ByteTokenizer()
TEXTS = ["\n\nHuman: Tell me about Dogs.\n\nAssistant:", "\n\nHuman: Owls?\n\nAssistant:", "Hi", "Frogs", "x"]


@pytest.mark.parametrize("samples", [1, 2])
def test_held_out_responses_are_the_ones_evaluate_scores(samples):
    maker = ExperienceMaker(tiny_models(perturb_policy=True), max_new_tokens=9, eos_token_id=TOK.eos_token_id,
                            pad_token_id=TOK.pad_token_id, advantage=AdvantageConfig(backend="torch"))
    ids = [TOK.encode(t) for t in TEXTS]
    means = maker.evaluate(TOK, ids, TEXTS, batch_size=2, samples=samples)
    r = held_out_responses(maker, TOK, ids, TEXTS, batch_size=2, samples=samples, greedy=True, kl=True)
    n = len(TEXTS) * samples
    assert len(r.completions) == n and r.scores.shape == r.lengths.shape == r.truncated.shape == r.kl.shape == (n,)
    assert len(r.greedy) == len(TEXTS) and r.greedy_scores.shape == (len(TEXTS),)
    assert float(r.scores.mean()) == pytest.approx(means["reward"], abs=1e-6)
    assert float(r.greedy_scores.mean()) == pytest.approx(means["greedy_reward"], abs=1e-6)
    assert float(r.kl.mean()) == pytest.approx(means["kl"], abs=1e-5)
    assert float(r.lengths.float().mean()) == pytest.approx(means["response_len"])
    plain = held_out_responses(maker, TOK, ids, TEXTS, batch_size=2, samples=samples)
    assert plain.kl is None and plain.greedy is None and plain.completions == r.completions
