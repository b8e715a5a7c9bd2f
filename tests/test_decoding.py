import pytest

from gptcli.config import SamplingConfig
from gptcli.decoding import Finished, IncrementalDetokenizer, KVSession, Token, common_prefix
from gptcli.engine import generate
from gptcli.stopping import StopMatcher
from gptcli.tokenizer import Tokenizer
from tests.scripted import ScriptedBackend

GREEDY = SamplingConfig(temperature=0, max_tokens=200)


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return Tokenizer(tiny_models["llama"])


def run(tokenizer, script, params=GREEDY, context=64, prompt=(1, 2, 3)):
    """Generate from a scripted backend that says `script`, then end-of-sequence."""
    eos = min(tokenizer.eos_ids)
    backend = ScriptedBackend([*script, eos], tokenizer.vocab_size, context)
    events = list(generate(backend, tokenizer, list(prompt), params))
    assert isinstance(events[-1], Finished)
    assert all(isinstance(e, Token) for e in events[:-1])
    return events, backend


TEXTS = [
    "Hello world",
    "中文测试：你好，世界！",
    "Emoji 🙂🚀🍁 mixed with café and naïve",
    "ROMEO: But soft, what light",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_joined_equals_full_decode_without_replacement_chars(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    events, _ = run(tokenizer, ids)
    streamed = [e.text for e in events[:-1]]
    assert "".join(streamed) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in streamed)
    assert events[-1].text == text


def test_multibyte_characters_really_span_tokens(tokenizer):
    # The point of the test above: this tokenizer splits one emoji over several tokens.
    ids = tokenizer.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids][:-1] == [""] * (len(ids) - 1)


def test_a_reply_cut_inside_a_character_ends_before_it_not_with_a_replacement_character(tokenizer):
    """QA: a reply cut by max_tokens mid-emoji ended in U+FFFD (the server's content too): its bytes are no text."""
    ids = tokenizer.encode("Party 🎉🐍🚀", add_special_tokens=False)
    whole = tokenizer.encode("Party 🎉🐍", add_special_tokens=False)
    assert ids[: len(whole)] == whole and len(ids) - len(whole) > 1  # the rocket is several tokens
    for cut in range(len(whole) + 1, len(ids)):  # the rocket begun, not finished
        events, _ = run(tokenizer, ids, SamplingConfig(temperature=0, max_tokens=cut))
        assert events[-1].reason == "length" and events[-1].text == "Party 🎉🐍", cut
        assert "".join(e.text for e in events[:-1]) == "Party 🎉🐍" and len(events[-1].token_ids) == cut
    literal = tokenizer.encode("odd \ufffd", add_special_tokens=False)  # the model's own U+FFFD is text: kept
    events, _ = run(tokenizer, literal, SamplingConfig(temperature=0, max_tokens=len(literal)))
    assert events[-1].text == "odd \ufffd"


def test_a_stray_byte_is_written_at_once_not_held_to_the_replys_end(tokenizer):
    """A byte no later token can make a character was held back as a character's start: the stream stopped there
    and every later token decoded the whole held window again (a random model's 900-token reply took 14 s)."""
    from gptcli.tokenizer import BYTE_LEVEL_ALPHABET

    stray = tokenizer.token_to_id(next(char for char, byte in BYTE_LEVEL_ALPHABET.items() if byte == 0x80))
    ids = [stray, *tokenizer.encode(" and then more words", add_special_tokens=False)]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(token) for token in ids]
    assert pieces[0] == "\ufffd" and "".join(pieces) + detok.flush() == tokenizer.decode(ids)
    assert len(detok._window) <= 2  # written tokens leave the window


STOP_CASES = [
    # (text the model produces, stops, what the user sees, finish reason)
    ("The capital of France is Paris. END of text", ["END"], "The capital of France is Paris. ", "stop"),
    ("abc STOP def", ["STOP", "def"], "abc ", "stop"),
    ("no stop string here", ["XYZ"], "no stop string here", "length"),
    ("almost ST", ["STOP"], "almost ST", "length"),  # a partial stop at the end is released
    ("line one\n\nline two", ["\n\n"], "line one", "stop"),
    ("emoji 🙂 then END", ["🙂"], "emoji ", "stop"),
    ("a stop that spans: R-O-M-E-O", ["R-O-M"], "a stop that spans: ", "stop"),
]


@pytest.mark.parametrize(("text", "stops", "shown", "reason"), STOP_CASES)
def test_stop_strings_never_leak(tokenizer, text, stops, shown, reason):
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingConfig(temperature=0, max_tokens=len(ids), stop=tuple(stops))
    events, _ = run(tokenizer, ids, params)
    streamed = "".join(e.text for e in events[:-1])
    assert streamed == shown
    assert events[-1].text == shown
    assert events[-1].reason == reason
    for stop in stops:
        if reason == "stop":
            assert stop not in streamed


def test_stop_matcher_holds_only_a_possible_prefix():
    matcher = StopMatcher(["</s>"])
    assert matcher.push("hello <") == ("hello ", False)
    assert matcher.push("b>") == ("<b>", False)
    assert matcher.push("x</") == ("x", False)
    assert matcher.push("s> tail") == ("", True)


def test_eos_stops_and_is_not_shown(tokenizer):
    ids = tokenizer.encode("Paris", add_special_tokens=False)
    eos = next(iter(tokenizer.eos_ids))
    events, _ = run(tokenizer, [*ids, eos, *ids])
    assert events[-1].reason == "stop"
    assert events[-1].text == "Paris"


def test_max_tokens_counts_new_tokens(tokenizer):
    ids = tokenizer.encode("one two three four five six", add_special_tokens=False)
    events, _ = run(tokenizer, ids, SamplingConfig(temperature=0, max_tokens=3))
    assert events[-1].reason == "length"
    assert events[-1].stats.new_tokens == 3


def test_stops_cleanly_at_the_context_end(tokenizer):
    ids = tokenizer.encode("word " * 40, add_special_tokens=False)
    events, backend = run(tokenizer, ids, context=10, prompt=(1, 2, 3, 4))
    final = events[-1]
    assert final.reason == "context"
    # Prompt and reply together fill the context, as vLLM's max_model_len bounds them; it had one token more
    # (the last one is never fed back), over what min_tokens and the server's usage said fits.
    assert final.stats.prompt_tokens + final.stats.new_tokens == 10
    assert sum(len(c) for c in backend.calls) == 9


def test_prefill_once_then_one_token_per_step(tokenizer):
    ids = tokenizer.encode("a b c d", add_special_tokens=False)
    _, backend = run(tokenizer, ids, prompt=(7, 8, 9, 10, 11))
    assert backend.calls[0] == [7, 8, 9, 10, 11]
    assert all(len(call) == 1 for call in backend.calls[1:])


def test_stats_are_consistent(tokenizer):
    ids = tokenizer.encode("counting the tokens", add_special_tokens=False)
    events, _ = run(tokenizer, ids)
    stats = events[-1].stats
    assert stats.prompt_tokens == 3
    assert stats.new_tokens == len(ids)
    assert stats.decode_steps == len(ids)  # the last step produced end-of-sequence
    assert 0 <= stats.ttft_s <= stats.total_s
    assert stats.as_dict()["new_tokens"] == len(ids)


def test_a_reply_without_a_token_has_no_time_to_first_token(tokenizer):
    """It reported the time to the end (to Ctrl-C, for an interrupted --json run) as ttft_s."""
    from gptcli.timings import timings_line

    empty = run(tokenizer, [])[0][-1].stats  # end-of-sequence first: nothing to show
    assert empty.new_tokens == 0 and empty.timings()["ttft_s"] is None and empty.as_dict()["ttft_s"] is None
    assert "TTFT none (no token)" in timings_line(empty)
    said = run(tokenizer, tokenizer.encode("Paris", add_special_tokens=False))[0][-1].stats
    assert said.timings()["ttft_s"] == round(said.ttft_s, 4) and "TTFT none" not in timings_line(said)


def test_session_reuses_the_shared_prefix(tokenizer):
    backend = ScriptedBackend([5] * 10, tokenizer.vocab_size)
    session = KVSession(backend)
    _, reused = session.feed([1, 2, 3, 4])
    assert reused == 0
    _, reused = session.feed([1, 2, 3, 4, 9, 9])
    assert reused == 4 and backend.calls[-1] == [9, 9]
    _, reused = session.feed([1, 2, 7])
    assert reused == 2 and backend.calls[-1] == [7]
    _, reused = session.feed([1, 2, 7])
    assert reused == 2 and backend.calls[-1] == [7]  # identical prompt: rerun the last token for logits


def test_interrupt_flushes_and_reports(tokenizer):
    ids = tokenizer.encode("interrupt me please, now", add_special_tokens=False)

    class Interrupting(ScriptedBackend):
        def forward(self, ids, cache):
            if len(self.calls) == 4:
                raise KeyboardInterrupt
            return super().forward(ids, cache)

    backend = Interrupting(ids, tokenizer.vocab_size)
    events = list(generate(backend, tokenizer, [1, 2], GREEDY))
    final = events[-1]
    assert final.reason == "interrupted"
    assert final.stats.new_tokens == 4
    assert "".join(e.text for e in events[:-1]) == final.text == tokenizer.decode(ids[:4])


def test_a_reply_that_only_repeats_itself_ends_with_reason_repetition(tokenizer):
    sentence = tokenizer.encode(" I am glad you are happy.", add_special_tokens=False)
    events, _ = run(tokenizer, sentence * 30, SamplingConfig(temperature=0, max_tokens=1000), context=4096)
    final = events[-1]
    assert final.reason == "repetition"
    repeats = max(4, -(-48 // len(sentence)))
    assert final.stats.new_tokens == len(sentence) * repeats  # stopped as soon as the loop was certain


def test_repetition_stop_can_be_turned_off_and_spares_ordinary_text(tokenizer):
    sentence = tokenizer.encode(" I am glad you are happy.", add_special_tokens=False)
    off = SamplingConfig(temperature=0, max_tokens=200, repetition_stop=False)
    events, _ = run(tokenizer, sentence * 30, off, context=4096)
    assert events[-1].reason == "length"
    # Text that repeats a word or a short rule a few times is not a loop.
    text = "the cat and the dog and the bird ======== and the end of the story, the end."
    events, _ = run(tokenizer, tokenizer.encode(text, add_special_tokens=False), GREEDY)
    assert events[-1].reason == "stop" and events[-1].text == text


def test_repetition_detector_finds_every_period():
    from gptcli.stopping import RepetitionDetector

    for period in (1, 2, 7, 40, 96):
        detector = RepetitionDetector()
        block = list(range(100, 100 + period))
        hits = [detector.add(t) for t in block * 60]
        first = hits.index(True)
        assert first + 1 == period * max(4, -(-48 // period)), period
    detector = RepetitionDetector()
    assert not any(detector.add(t) for t in range(1000))


def test_ignore_eos_keeps_going_past_end_of_sequence(tokenizer):
    ids = tokenizer.encode("Paris", add_special_tokens=False)
    eos = next(iter(tokenizer.eos_ids))
    params = SamplingConfig(temperature=0, max_tokens=2 * len(ids) + 1, ignore_eos=True)
    events, _ = run(tokenizer, [*ids, eos, *ids], params)
    assert events[-1].reason == "length"
    assert events[-1].stats.new_tokens == 2 * len(ids) + 1


def test_logprobs_ride_on_each_token_and_do_not_change_the_tokens(tokenizer):
    ids = tokenizer.encode("café 🙂 soft", add_special_tokens=False)
    plain, _ = run(tokenizer, ids)
    scored, _ = run(tokenizer, ids, SamplingConfig(temperature=0, max_tokens=200, logprobs=2))
    assert [e.id for e in plain[:-1]] == [e.id for e in scored[:-1]] and plain[-1].text == scored[-1].text
    assert all(e.logprob is None for e in plain[:-1]) and plain[-1].logprobs == ()
    tokens = [e for e in scored[:-1] if e.id is not None]
    assert [e.id for e in tokens] == list(scored[-1].token_ids) == ids
    assert [e.logprob for e in tokens] == list(scored[-1].logprobs)
    for event in tokens:
        # The scripted backend puts all its mass on the token it says: log-probability ~0, itself the best.
        assert event.logprob.logprob == pytest.approx(0.0, abs=1e-6)
        assert len(event.logprob.top) == 2 and event.logprob.top[0][0] == event.id


def test_common_prefix_finds_the_first_difference_anywhere():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.randint(0, 3) for _ in range(rng.randint(0, 40))]
        b = a[: rng.randint(0, len(a))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 10))]
        pairs = enumerate(zip(a, b, strict=False))
        expected = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == common_prefix(tuple(b), a) == expected


def test_token_bytes_of_a_character_split_over_tokens_join_to_its_utf8(tokenizer, tmp_path):
    # Each piece of an emoji decodes alone to U+FFFD; its bytes (OpenAI's logprobs `bytes`) must be its own.
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models

    vocab = {"<unk>": 0, **{f"<0x{byte:02X}>": byte + 1 for byte in range(256)}, "hi": 257}
    fallback = FastTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    fallback.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    fallback.save(str(tmp_path / "tokenizer.json"))  # sentencepiece's byte tokens, as Llama 2's
    for tok in (tokenizer, Tokenizer(tmp_path)):  # byte-level BPE (GPT-2, Llama 3, SmolLM) and <0xF0> pieces
        pieces = tok.encode("🚀", add_special_tokens=False)
        assert len(pieces) > 1 and all(tok.decode([i]) == "\ufffd" for i in pieces)
        assert b"".join(tok.token_bytes(i) for i in pieces) == "🚀".encode()
        assert (
            b"".join(tok.token_bytes(i) for i in tok.encode("hi 🚀 é", add_special_tokens=False)) == "hi 🚀 é".encode()
        )
