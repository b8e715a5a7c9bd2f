from dataclasses import replace

import numpy as np
import pytest

from gptcli.config import SamplingConfig
from gptcli.sampling import (
    apply_frequency_presence,
    apply_logit_bias,
    apply_repetition_penalty,
    filter_probs,
    make_rng,
    sample,
    token_logprobs,
)


def probs(*values):
    p = np.array(values, dtype=np.float64)
    return p / p.sum()


def test_greedy_picks_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert sample(logits, SamplingConfig(temperature=0), make_rng(0)) == 1


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # input untouched


def test_a_penalty_too_small_for_float32_warns_nothing():
    import warnings

    logits = np.array([1.0, -1.0, 0.5], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: "RuntimeWarning: divide by zero" on the user's stderr
        out = apply_repetition_penalty(logits, [0, 1], 1e-300)
    assert out[0] == np.inf and out[2] == np.float32(0.5)


def test_repetition_penalty_changes_greedy_choice():
    logits = np.array([2.0, 1.5], dtype=np.float32)
    assert sample(logits, SamplingConfig(temperature=0, repetition_penalty=2.0), make_rng(0), history=[0]) == 1


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p", "kept"),
    [
        (0, 1.0, 0.0, [0, 1, 2, 3]),
        (2, 1.0, 0.0, [0, 1]),
        (0, 0.4, 0.0, [0]),
        (0, 0.5, 0.0, [0, 1]),  # cumulative 0.4, 0.7: the smallest prefix reaching 0.5 has two tokens
        (0, 0.75, 0.0, [0, 1, 2]),
        (0, 1.0, 0.5, [0, 1, 2]),  # keep p >= 0.5 * 0.4
        (0, 1.0, 0.6, [0, 1]),
        (3, 0.9, 0.0, [0, 1, 2]),
    ],
)
def test_filters_keep_the_expected_candidates(top_k, top_p, min_p, kept):
    p = probs(0.4, 0.3, 0.2, 0.1)
    ids, renormalised = filter_probs(p, top_k, top_p, min_p)
    assert ids.tolist() == kept
    assert renormalised.sum() == pytest.approx(1.0)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = np.random.default_rng(3).normal(size=500).astype(np.float32)
    params = SamplingConfig(temperature=1.0, top_p=1.0, min_p=0.0)
    a = [sample(logits, params, rng) for rng in [make_rng(7)] for _ in range(50)]
    b = [sample(logits, params, rng) for rng in [make_rng(7)] for _ in range(50)]
    c = [sample(logits, params, rng) for rng in [make_rng(8)] for _ in range(50)]
    assert a == b
    assert a != c


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float32))
    rng = make_rng(0)
    params = SamplingConfig(temperature=1.0, top_p=1.0, min_p=0.0)
    draws = np.bincount([sample(logits, params, rng) for _ in range(4000)], minlength=3) / 4000
    assert draws == pytest.approx([0.7, 0.2, 0.1], abs=0.03)


def test_low_temperature_concentrates_mass():
    logits = np.array([1.0, 0.9, 0.0], dtype=np.float32)
    rng = make_rng(0)
    params = SamplingConfig(temperature=0.01, top_p=1.0, min_p=0.0)
    assert {sample(logits, params, rng) for _ in range(100)} == {0}


def test_logit_bias_adds_to_the_listed_tokens_and_bans_or_forces():
    logits = np.array([2.0, 1.0, 0.5, -1.0], dtype=np.float32)
    out = apply_logit_bias(logits, ((1, 1.5), (3, -2.0), (99, 5.0)))  # 99 is past the row: left out
    assert out.tolist() == [2.0, 2.5, 0.5, -3.0]
    assert logits.tolist() == [2.0, 1.0, 0.5, -1.0]  # input untouched
    greedy = SamplingConfig(temperature=0)
    assert sample(logits, replace(greedy, logit_bias=((0, -100.0),)), make_rng(0)) == 1
    assert sample(logits, replace(greedy, logit_bias=((3, 100.0),)), make_rng(0)) == 3
    # Sampling at a temperature: a banned token is never drawn.
    banned = replace(SamplingConfig(temperature=1.0, top_p=1.0, min_p=0.0), logit_bias=((0, -100.0),))
    rng = make_rng(1)
    assert 0 not in {sample(logits, banned, rng) for _ in range(300)}


def test_token_logprobs_are_the_models_log_softmax_with_the_best_alternatives():
    logits = np.array([2.0, 1.0, 3.0, -1.0, 3.0], dtype=np.float32)
    expected = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    scored = token_logprobs(logits, 1, top=3)
    assert scored.logprob == pytest.approx(expected[1], abs=1e-12)
    assert [token for token, _ in scored.top] == [2, 4, 0]  # most likely first, ties in id order
    assert [value for _, value in scored.top] == pytest.approx(expected[[2, 4, 0]].tolist(), abs=1e-12)
    assert token_logprobs(logits, 3).top == ()
    assert len(token_logprobs(logits, 0, top=50).top) == 5  # never more than the vocabulary


def test_frequency_and_presence_penalties_count_the_reply_only():
    logits = np.array([3.0, 2.5, 1.0, 0.0], dtype=np.float32)
    out = apply_frequency_presence(logits, [0, 0, 2, 99], frequency=0.5, presence=0.25)  # 99: past the row
    assert out.tolist() == [3.0 - 2 * 0.5 - 0.25, 2.5, 1.0 - 0.5 - 0.25, 0.0]
    assert logits.tolist() == [3.0, 2.5, 1.0, 0.0]  # input untouched
    greedy = SamplingConfig(temperature=0, presence_penalty=1.0)
    # Token 0 was in the reply: penalised below token 1. In the prompt only (history), it is not.
    assert sample(logits, greedy, make_rng(0), history=[0], generated=[0]) == 1
    assert sample(logits, greedy, make_rng(0), history=[0], generated=[]) == 0
    # A negative frequency penalty favours what was said already.
    assert sample(logits, SamplingConfig(temperature=0, frequency_penalty=-2.0), make_rng(0), generated=[1]) == 1


def test_logits_a_penalty_spread_over_the_whole_float_range_sample_without_a_warning():
    """A tiny repetition penalty scaled logits to ±1e308; shifting by the max overflowed to -inf (probability 0,
    as it should be) with numpy's "overflow encountered in subtract" on the server's stderr."""
    import warnings

    logits = np.array([1.5e308, -1.5e308, 0.5, 2.0], dtype=np.float64)
    params = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sample(logits, params, np.random.default_rng(0)) == 0
