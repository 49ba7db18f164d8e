"""The length/EOS rule (docs/lengths.md): scoring forces an EOS on a cut response, SFT cuts without one."""

import pytest

from rlhf_fast.data import (
    ByteTokenizer,
    PreferenceDataset,
    PreferenceExample,
    SFTDataset,
    SFTExample,
    encode_pair,
    fit_response,
)

EOS = 99


@pytest.mark.parametrize("force_eos", [True, False])
def test_a_response_that_fits_ends_in_eos_and_is_not_truncated(force_eos):
    assert fit_response([1, 2, 3], 4, EOS, force_eos=force_eos) == ([1, 2, 3, EOS], False)  # exactly fits
    assert fit_response([1, 2], 7, EOS, force_eos=force_eos) == ([1, 2, EOS], False)
    assert fit_response([], 1, EOS, force_eos=force_eos) == ([EOS], False)


def test_scoring_rule_keeps_budget_minus_one_tokens_then_forced_eos():
    assert fit_response([1, 2, 3, 4], 4, EOS, force_eos=True) == ([1, 2, 3, EOS], True)  # EOS did not fit
    assert fit_response(list(range(1, 50)), 5, EOS, force_eos=True) == ([1, 2, 3, 4, EOS], True)
    assert fit_response([1, 2, 3], 1, EOS, force_eos=True) == ([EOS], True)


def test_sft_rule_cuts_without_eos():
    assert fit_response([1, 2, 3, 4], 4, EOS, force_eos=False) == ([1, 2, 3, 4], True)
    assert fit_response(list(range(1, 50)), 5, EOS, force_eos=False) == ([1, 2, 3, 4, 5], True)


@pytest.mark.parametrize("force_eos", [True, False])
def test_a_trailing_eos_is_the_end_marker_and_the_rule_is_idempotent(force_eos):
    # a generated response that stopped by itself: same result with or without its EOS passed in
    assert fit_response([5, 6, EOS], 3, EOS, force_eos=force_eos) == ([5, 6, EOS], False)
    assert fit_response([5, 6, 7, EOS], 3, EOS, force_eos=force_eos) == fit_response([5, 6, 7], 3, EOS,
                                                                                    force_eos=force_eos)
    once, _ = fit_response(list(range(20)), 6, EOS, force_eos=True)
    assert fit_response(once, 6, EOS, force_eos=True) == (once, False)


def test_rollout_cut_at_max_new_tokens_is_scored_with_an_eos_appended():
    # the RL scoring case: budget = max_new_tokens + 1, a completion of max_new_tokens tokens (no EOS)
    max_new_tokens = 4
    assert fit_response([7, 7, 7, 7], max_new_tokens + 1, EOS, force_eos=True) == ([7, 7, 7, 7, EOS], False)


def test_encode_pair_gives_the_prompt_its_end_and_the_response_the_rest():
    e = encode_pair(list(range(10)), [20, 21, 22, 23], eos_token_id=EOS, max_prompt_len=4, max_len=7,
                    force_eos=True)
    assert (e.prompt_ids, e.response_ids, e.truncated) == ([6, 7, 8, 9], [20, 21, EOS], True)
    e = encode_pair([1], [20, 21], eos_token_id=EOS, max_prompt_len=4, max_len=7, force_eos=True)
    assert (e.prompt_ids, e.response_ids, e.truncated) == ([1], [20, 21, EOS], False)
    with pytest.raises(ValueError, match="max_prompt_len"):
        encode_pair([1], [2], eos_token_id=EOS, max_prompt_len=7, max_len=7, force_eos=True)
    with pytest.raises(ValueError, match="budget"):
        fit_response([1], 0, EOS, force_eos=True)


def test_datasets_apply_the_rule_and_count_what_they_cut():
    tok = ByteTokenizer()
    eos = tok.eos_token_id
    pairs = [PreferenceExample("p", "abcdefghij", "ab"),  # chosen cut, rejected fits
             PreferenceExample("p", "ab", "cd"),  # neither cut
             PreferenceExample("p", "abcdefghij", "klmnopqrst")]  # both cut
    pref = PreferenceDataset(pairs, tok, max_prompt_len=2, max_len=6)
    assert pref[0]["chosen_ids"] == list(b"pabcd") + [eos] and pref[0]["rejected_ids"] == list(b"pab") + [eos]
    assert all(it[k][-1] == eos for it in pref.items for k in ("chosen_ids", "rejected_ids"))  # all end in EOS
    assert pref.truncated == [(True, False), (False, False), (True, True)]
    assert (pref.n_truncated, pref.n_one_side_truncated) == (2, 1)

    sft = SFTDataset([SFTExample("p", "abcdefghij"), SFTExample("p", "ab")], tok, max_prompt_len=2, max_len=6)
    assert sft[0]["input_ids"] == list(b"pabcde") and sft[0]["loss_mask"] == [0, 1, 1, 1, 1, 1]  # no EOS
    assert sft[1]["input_ids"] == list(b"pab") + [eos]
    assert sft.truncated == [True, False] and sft.n_truncated == 1


def test_append_eos_is_fit_response_on_a_batch():
    """Rollout rows (left-padded prompt + response, pad after a sampled EOS): truncated rows get an EOS in
    one extra column, exactly what fit_response(.., max_new_tokens + 1, force_eos=True) gives row by row."""
    import torch

    from rlhf_fast.data import append_eos

    EOS, PAD, N = 9, 0, 4
    prompts = [[5, 6], [7]]
    responses = [[1, 2, 3, 4], [1, EOS]]  # row 0 hit max_new_tokens without EOS; row 1 stopped itself
    ids = torch.tensor([[5, 6, 1, 2, 3, 4], [PAD, 7, 1, EOS, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    truncated = torch.tensor([True, False])
    out, out_mask = append_eos(ids, mask, truncated, EOS, PAD)
    for b in range(2):
        want, cut = fit_response(responses[b], N + 1, EOS, force_eos=True)
        assert out[b][out_mask[b]].tolist() == prompts[b] + want and not cut
    assert out.shape == (2, 7) and out_mask[1, -1].item() is False
