"""vLLM's stopping options (min_tokens, stop_token_ids, include_stop_str_in_output) in the one decoding
loop, and their one check (gptcli.stopping), which the server and batch lines share."""

from __future__ import annotations

import re

import pytest

from gptcli.config import OutputConstraint, SamplingConfig
from gptcli.decoding import Finished, Token
from gptcli.engine import generate
from gptcli.errors import FieldError
from gptcli.stopping import MAX_STOP_TOKEN_IDS, StopMatcher, stop_options
from gptcli.tokenizer import Tokenizer
from tests.scripted import ScriptedBackend


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return Tokenizer(tiny_models["llama"])


def run(tokenizer, script, **params):
    """(streamed text, Finished) of a scripted backend whose favourite token is script[i] at step i."""
    backend = ScriptedBackend(script, tokenizer.vocab_size, 256)
    settings = SamplingConfig(temperature=0, **{"max_tokens": 100, **params})
    events = list(generate(backend, tokenizer, [1, 2, 3], settings))
    assert isinstance(events[-1], Finished) and all(isinstance(e, Token) for e in events[:-1])
    streamed = "".join(e.text for e in events[:-1])
    assert streamed == events[-1].text
    return streamed, events[-1]


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_min_tokens_masks_end_of_sequence_until_that_many_tokens(tokenizer):
    eos = min(tokenizer.eos_ids)
    _, finished = run(tokenizer, [eos] * 10)
    assert (finished.reason, finished.stats.new_tokens) == ("stop", 0)
    _, finished = run(tokenizer, [eos] * 10, min_tokens=5)
    assert (finished.reason, finished.stats.new_tokens) == ("stop", 5)
    assert not set(finished.token_ids) & tokenizer.eos_ids


def test_a_stop_token_id_ends_the_reply_without_its_text_unless_asked(tokenizer):
    paris, rome = ids(tokenizer, "Paris"), ids(tokenizer, " Rome")
    script = [*paris, *rome, *ids(tokenizer, " Berlin")]
    text, finished = run(tokenizer, script, stop_token_ids=(rome[0],))
    assert (text, finished.reason, finished.token_ids) == ("Paris", "stop", tuple(paris))
    text, finished = run(tokenizer, script, stop_token_ids=(rome[0],), include_stop_str_in_output=True)
    assert (finished.reason, finished.token_ids) == ("stop", (*paris, rome[0]))
    assert text == tokenizer.decode([*paris, rome[0]])
    # Held off by min_tokens like end-of-sequence: the scripted id is masked, then ends the reply.
    _, finished = run(tokenizer, [rome[0]] * 10, stop_token_ids=(rome[0],), min_tokens=3)
    assert (finished.reason, finished.stats.new_tokens) == ("stop", 3)
    assert rome[0] not in finished.token_ids


def test_stop_strings_count_only_once_min_tokens_were_generated(tokenizer):
    first = ids(tokenizer, "Paris END")
    script = [*first, *ids(tokenizer, " Rome END"), *ids(tokenizer, " more")]
    assert run(tokenizer, script, stop=("END",))[0] == "Paris "
    # vLLM's rule: a stop string ending in the first min_tokens tokens does not count; ending after them, it does.
    text, finished = run(tokenizer, script, stop=("END",), min_tokens=len(first))
    assert (text, finished.reason) == ("Paris END Rome ", "stop")
    assert run(tokenizer, script, stop=("END",), min_tokens=len(first) - 1)[0] == "Paris "


def test_include_stop_str_in_output_keeps_the_stop_string_even_across_tokens(tokenizer):
    text = "a stop that spans: R-O-M-E-O"
    script = ids(tokenizer, text)
    assert len(ids(tokenizer, "R-O-M")) > 1
    kept, finished = run(tokenizer, script, stop=("R-O-M",), include_stop_str_in_output=True)
    assert (kept, finished.reason) == ("a stop that spans: R-O-M", "stop")
    assert run(tokenizer, script, stop=("R-O-M",))[0] == "a stop that spans: "


def test_stop_matcher_that_keeps_the_stop_string_holds_nothing_back():
    matcher = StopMatcher(["</s>"], keep=True)
    assert matcher.push("hello <") == ("hello <", False)
    assert matcher.push("/s> tail") == ("/s>", True)
    late = StopMatcher(["ab", "xabc"])
    assert late.push("xab", match=False) == ("", False)  # held: it may start "xabc"
    assert late.push("c") == ("", True)  # "xabc" ends in the new text; "ab" ended before it counted


def test_min_tokens_holds_off_the_repetition_stop(tokenizer):
    loop = ids(tokenizer, " la")[:1] * 90
    _, finished = run(tokenizer, loop)
    assert finished.reason == "repetition" and finished.stats.new_tokens < 60
    _, finished = run(tokenizer, loop, min_tokens=60)
    assert (finished.reason, finished.stats.new_tokens) == ("repetition", 60)


def test_a_grammar_that_can_only_end_ends_before_min_tokens(tokenizer):
    eos = min(tokenizer.eos_ids)
    text, finished = run(tokenizer, [eos] * 30, min_tokens=20, constraint=OutputConstraint("regex", "yes"))
    assert (text, finished.reason) == ("yes", "stop")
    # One that may go on does, and still matches.
    text, finished = run(tokenizer, [eos] * 30, min_tokens=8, constraint=OutputConstraint("regex", "(ab)+"))
    assert finished.reason == "stop" and finished.stats.new_tokens >= 8 and re.fullmatch("(ab)+", text)


CHECKS = [
    ({"min_tokens": -1}, "min_tokens", "must be a whole number >= 0, got -1"),
    ({"min_tokens": True}, "min_tokens", "must be a whole number >= 0, got true"),
    ({"min_tokens": "5"}, "min_tokens", 'must be a whole number >= 0, got "5"'),
    ({"min_tokens": 5.0}, "min_tokens", "must be a whole number >= 0, got 5.0"),
    ({"min_tokens": 17}, "min_tokens", "must be at most max_tokens (16), got 17"),
    ({"stop_token_ids": 5}, "stop_token_ids", "must be a list of token ids, got 5"),
    ({"stop_token_ids": [True]}, "stop_token_ids", "a token id is a whole number, got true"),
    ({"stop_token_ids": [400]}, "stop_token_ids", "token 400 is not in the vocabulary [0, 400)"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "token -1 is not in the vocabulary [0, 400)"),
    ({"stop_token_ids": [1] * 65}, "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} token ids, got 65"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output", "must be true or false, got 1"),
]


@pytest.mark.parametrize(("fields", "param", "message"), CHECKS)
def test_each_bad_stop_option_is_a_field_error_naming_it(fields, param, message):
    with pytest.raises(FieldError) as caught:
        stop_options(fields, SamplingConfig(max_tokens=16), 400)
    assert (caught.value.param, caught.value.message) == (param, f"{param}: {message}")


def test_good_stop_options_become_settings_and_nulls_change_nothing():
    params = SamplingConfig(max_tokens=16)
    fields = {"min_tokens": 16, "stop_token_ids": [7, 3, 7], "include_stop_str_in_output": True}
    changed = stop_options(fields, params, 400)
    assert (changed.min_tokens, changed.stop_token_ids, changed.include_stop_str_in_output) == (16, (7, 3), True)
    assert stop_options(dict.fromkeys(fields), params, 400) == params
    assert stop_options({"stop_token_ids": [123456]}, params, None).stop_token_ids == (123456,)  # the server checks
