"""The engine: continuous batching, chunked prefill, the KV budget, cancellation, background mode."""

import threading

import numpy as np
import pytest

from gptcli.backends.base import LoadOptions
from gptcli.backends.torch_backend import TorchBackend
from gptcli.config import SamplingConfig
from gptcli.decoding import Finished, Token
from gptcli.engine import Engine, EngineLimits, generate, parse_kv_budget, run_all
from gptcli.engine.run import drive
from gptcli.errors import ConfigError, InputError, QueueFullError
from gptcli.tokenizer import Tokenizer
from tests.scripted import ScriptedBackend

GREEDY = SamplingConfig(temperature=0, max_tokens=12)
CPU32 = LoadOptions(device="cpu", dtype="float32")
PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def add(a, b):",
    "ROMEO: But soft, what light through yonder window breaks? It is",
    "中文测试",
    "Emoji: 🙂",
    "The capital of Italy is Rome. The capital of France",
    "a",
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tiny_models):
    backend = TorchBackend.load(tiny_models[request.param], CPU32)
    return backend, Tokenizer(tiny_models[request.param])


def _finished(events):
    final = [e for e in events if isinstance(e, Finished)]
    assert len(final) == 1 and events[-1] is final[0]
    return final[0]


def test_a_batch_of_eight_mixed_lengths_gives_each_sequence_its_tokens_alone(model):
    backend, tok = model
    prompts = [tok.encode(p) for p in PROMPTS]
    alone = [_finished(list(generate(backend, tok, ids, GREEDY))) for ids in prompts]
    # Chunks of 5 and at most 7 prompt tokens a step: prompts wait their turn without changing an answer.
    engine = Engine(backend, tok, EngineLimits(max_running=8, prefill_chunk=5, step_prefill_tokens=7))
    events: dict[int, list] = {i: [] for i in range(len(prompts))}
    for index, event in run_all(engine, [(ids, GREEDY) for ids in prompts]):
        events[index].append(event)
    for i, ids in enumerate(prompts):
        together = _finished(events[i])
        assert together.token_ids == alone[i].token_ids, PROMPTS[i]
        assert together.text == alone[i].text == "".join(e.text for e in events[i] if isinstance(e, Token))
        assert together.stats.prompt_tokens == len(ids)
    assert engine.snapshot().running == 0 and engine.snapshot().kv_used_tokens == 0


def test_a_sequence_can_score_its_prompt_beside_the_batch_without_changing_any_answer(model, monkeypatch):
    from dataclasses import replace

    from gptcli.backends.base import score_positions
    from gptcli.engine import scoring

    backend, tok = model
    monkeypatch.setattr(scoring, "SCORE_ROWS", 3)  # several score calls per chunk, and a short last one
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    alone = [_finished(list(generate(backend, tok, ids, GREEDY))) for ids in prompts]
    scoring = replace(GREEDY, prompt_logprobs=2)
    engine = Engine(backend, tok, EngineLimits(max_running=4, prefill_chunk=5, step_prefill_tokens=7))
    jobs = [(ids, scoring if i == 3 else GREEDY) for i, ids in enumerate(prompts)]
    events: dict[int, list] = {i: [] for i in range(len(prompts))}
    for index, event in run_all(engine, jobs):
        events[index].append(event)
    for i in range(len(prompts)):  # the batch's answers, the scoring sequence's own included, are unchanged
        assert _finished(events[i]).token_ids == alone[i].token_ids, PROMPTS[i]
    scored = _finished(events[3]).prompt_logprobs
    ids = prompts[3]
    assert len(scored) == len(ids) and scored[0] is None
    rows, _ = score_positions(backend, ids, backend.new_cache())
    rows = np.asarray(rows, dtype=np.float64)
    log_softmax = rows - rows.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    for position in range(1, len(ids)):
        expected = log_softmax[position - 1]
        assert scored[position].logprob == pytest.approx(expected[ids[position]], abs=1e-4)
        assert [t for t, _ in scored[position].top] == list(np.argsort(-expected, kind="stable")[:2])
    assert _finished(events[0]).prompt_logprobs == ()  # only asked for where asked


def test_max_tokens_zero_reads_the_prompt_and_generates_nothing(model):
    from dataclasses import replace

    backend, tok = model
    ids = tok.encode(PROMPTS[1])
    final = _finished(list(generate(backend, tok, ids, replace(GREEDY, max_tokens=0, prompt_logprobs=0))))
    assert final.reason == "length" and final.token_ids == () and final.text == ""
    assert len(final.prompt_logprobs) == len(ids)


def _one(engine, ids, params=GREEDY):
    events = [event for _, event in run_all(engine, [(ids, params)])]
    return _finished(events)


def test_the_prefix_cache_reuses_whole_chunks_and_changes_no_answer(model):
    backend, tok = model
    base = tok.encode(PROMPTS[3])
    later = base + tok.encode(" and the sun rises", add_special_tokens=False)
    chunk = next(size for size in (4, 3, 5) if len(base) % size)  # the prompt ends inside a chunk
    limits = EngineLimits(max_running=4, prefill_chunk=chunk, step_prefill_tokens=8, prefix_cache=2)
    engine = Engine(backend, tok, limits)
    first = _one(engine, base)
    assert first.token_ids == _finished(list(generate(backend, tok, base, GREEDY))).token_ids
    whole_chunks = len(base) - len(base) % chunk
    assert whole_chunks >= 2 * chunk and engine.snapshot().kv_cached_tokens == whole_chunks  # the rest is freed
    second = _one(engine, later)
    assert second.stats.cached_tokens == whole_chunks  # the first prompt's whole chunks, read once
    assert second.token_ids == _finished(list(generate(backend, tok, later, GREEDY))).token_ids
    # A prompt that leaves the cached one inside its first chunk reuses nothing, and answers as alone.
    other = base[:2] + tok.encode(" something else entirely", add_special_tokens=False)
    third = _one(engine, other)
    assert third.stats.cached_tokens == 0
    assert third.token_ids == _finished(list(generate(backend, tok, other, GREEDY))).token_ids
    assert len(engine._prefixes) <= 2  # --prefix-cache entries at most


def test_the_prefix_cache_keeps_one_entry_per_prefix(model):
    """Requests on one system prompt filled every entry with copies of its prefix, evicting every other
    prompt's: a prefix used a moment ago was read again in full."""
    backend, tok = model
    first, other = tok.encode(PROMPTS[3]), tok.encode(PROMPTS[6])
    engine = Engine(backend, tok, EngineLimits(max_running=2, prefill_chunk=4, prefix_cache=2))
    _one(engine, first + tok.encode(" one", add_special_tokens=False))
    for question in ("two", "six", "ten"):  # the same whole chunks each time: one system prompt, short questions
        _one(engine, other + tok.encode(f" {question}", add_special_tokens=False)[:2])
    assert len(engine._prefixes) == 2
    whole = len(first) - len(first) % 4
    again = first + tok.encode(" five", add_special_tokens=False)
    assert _one(engine, again).stats.cached_tokens >= whole
    assert _one(engine, again).token_ids == _finished(list(generate(backend, tok, again, GREEDY))).token_ids


def test_sequences_that_arrive_together_each_get_a_copy_of_the_cached_prefix(model):
    backend, tok = model
    base = tok.encode(PROMPTS[3])
    engine = Engine(backend, tok, EngineLimits(max_running=4, prefill_chunk=4, prefix_cache=2))
    _one(engine, base)
    cached = engine.snapshot().kv_cached_tokens
    prompts = [base + tok.encode(tail, add_special_tokens=False) for tail in (" one", " two two", " three")]
    events: dict[int, list] = {i: [] for i in range(3)}
    for index, event in run_all(engine, [(ids, GREEDY) for ids in prompts]):
        events[index].append(event)
    for i, ids in enumerate(prompts):
        together = _finished(events[i])
        assert together.stats.cached_tokens == cached  # one prefix, three copies
        assert together.token_ids == _finished(list(generate(backend, tok, ids, GREEDY))).token_ids


def test_sequences_that_start_alike_together_read_each_shared_chunk_once(model):
    backend, tok = model
    base = tok.encode(PROMPTS[3] + " " + PROMPTS[6])
    prompts = [base + tok.encode(tail, add_special_tokens=False) for tail in (" one", " two two", " three", " 4")]
    # One chunk a step: the first arrival reads each chunk, the others copy it before their turn comes.
    engine = Engine(backend, tok, EngineLimits(max_running=4, prefill_chunk=4, step_prefill_tokens=4, prefix_cache=1))
    events: dict[int, list] = {i: [] for i in range(len(prompts))}
    for index, event in run_all(engine, [(ids, GREEDY) for ids in prompts]):
        events[index].append(event)
    shared = len(base) - len(base) % 4
    cached = [_finished(events[i]).stats.cached_tokens for i in range(len(prompts))]
    assert cached[0] == 0 and all(c >= shared - 4 for c in cached[1:]), (cached, shared)
    for i, ids in enumerate(prompts):
        assert _finished(events[i]).token_ids == _finished(list(generate(backend, tok, ids, GREEDY))).token_ids


def test_the_prefix_cache_gives_its_room_back_before_anyone_waits(model):
    backend, tok = model
    base = tok.encode(PROMPTS[3])
    budget = len(base) + GREEDY.max_tokens
    limits = EngineLimits(max_running=2, kv_budget_tokens=budget, prefill_chunk=4, prefix_cache=4)
    engine = Engine(backend, tok, limits)
    _one(engine, base)
    assert engine.snapshot().kv_cached_tokens > 0
    fresh = tok.encode("A completely different prompt of its own", add_special_tokens=False)
    long_reply = SamplingConfig(temperature=0, max_tokens=budget - len(fresh))  # all the budget
    handle = engine.submit(fresh, long_reply)
    assert engine.step()  # admitted at once: the cached positions were given back
    assert engine.snapshot().running == 1 and engine.snapshot().kv_cached_tokens == 0
    engine.cancel(handle)
    list(drive(engine, [handle]))


def test_sequences_join_and_leave_at_step_boundaries(model):
    backend, tok = model
    engine = Engine(backend, tok, EngineLimits(max_running=2))
    short = SamplingConfig(temperature=0, max_tokens=2)
    long = SamplingConfig(temperature=0, max_tokens=8)
    handles = [engine.submit(tok.encode(p), params) for p, params in zip(PROMPTS[:3], [short, long, long], strict=True)]
    running = []
    while not all(h.done for h in handles):
        engine.step()
        running.append(engine.snapshot().running)
    assert max(running) == 2  # the third waited for a free place, then joined while the long one ran
    assert [h.result.stats.new_tokens for h in handles] == [2, 8, 8]


class CountingBackend(ScriptedBackend):
    """Scripted, but records every batch and which caches were released."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.released = [], []

    def step(self, batch):
        self.batches.append([list(ids) for ids, _ in batch])
        rows = [self.forward(ids, cache) for ids, cache in batch]
        return np.stack([r[0] for r in rows]), [r[1] for r in rows]

    def release(self, cache):
        self.released.append(cache)


def test_a_long_prompt_is_read_in_chunks_while_others_keep_decoding(model):
    _, tok = model
    backend = CountingBackend([7] * 200, tok.vocab_size, context_length=128)
    engine = Engine(backend, tok, EngineLimits(max_running=2, prefill_chunk=4))
    params = SamplingConfig(temperature=0, max_tokens=6)
    first = engine.submit([1, 2], params)
    engine.step()  # the short prompt is read: it decodes from now on
    second = engine.submit(list(range(10, 20)), params)
    while not (first.done and second.done):
        engine.step()
    lengths = [[len(ids) for ids in batch] for batch in backend.batches]
    assert lengths[:4] == [[2], [1, 4], [1, 4], [1, 2]]  # 10 prompt tokens as 4 + 4 + 2 beside decode steps
    assert len(backend.released) == 2


def test_a_burst_of_prompts_is_read_oldest_first_and_short_ones_do_not_wait_for_long_ones(model):
    _, tok = model
    backend = CountingBackend([7] * 200, tok.vocab_size, context_length=128)
    engine = Engine(backend, tok, EngineLimits(max_running=5, prefill_chunk=4, step_prefill_tokens=6))
    params = SamplingConfig(temperature=0, max_tokens=3)
    first = engine.submit([1, 2], params)
    engine.step()  # decoding from now on
    burst = [engine.submit(list(range(10, 10 + n)), params) for n in (5, 9, 3, 2)]
    while not all(h.done for h in [first, *burst]):
        engine.step()
    lengths = [[len(ids) for ids in batch] for batch in backend.batches]
    # Step 2: the decoding one and the oldest prompt's first chunk (4); the 9-token prompt's chunk (4) would
    # pass the budget of 6 and waits, but the 3- and 2-token prompts end in this step and take the second
    # budget (4 + 3 + 2 = 9 <= 12). Step 3: the oldest's last token, the 9-token one's first chunk (1 + 4 = 5),
    # and two decodes. Step 4: its second chunk. Step 5: its last token, beside the oldest's decode.
    assert lengths[:5] == [[2], [1, 4, 3, 2], [1, 1, 4, 1, 1], [1, 4, 1, 1], [1, 1]]
    assert [h.result.stats.new_tokens for h in burst] == [3, 3, 3, 3]


def test_a_short_prompt_gets_its_first_token_while_a_long_one_is_still_read(model):
    """A 31-token chat waited for all of a 4,000-token prompt's chunks (38 s) before its first token."""
    _, tok = model
    backend = CountingBackend([7] * 400, tok.vocab_size, context_length=256)
    engine = Engine(backend, tok, EngineLimits(max_running=4, prefill_chunk=8, step_prefill_tokens=8))
    long = engine.submit(list(range(10, 90)), SamplingConfig(temperature=0, max_tokens=2))  # 10 chunks
    engine.step()
    short = engine.submit([5, 6, 7], SamplingConfig(temperature=0, max_tokens=2))
    engine.step()
    assert short.result is None and [len(ids) for ids in backend.batches[-1]] == [8, 3]
    engine.step()
    assert short.done and not long.done  # its 2 tokens, while the long prompt has 7 chunks to go
    while not long.done:
        engine.step()
    assert [len(ids) for ids in backend.batches[2]] == [8, 1]  # the short one decodes beside the next chunk
    assert sum(len(batch[0]) for batch in backend.batches if len(batch[0]) > 1) == 80  # every chunk whole


def test_one_chunk_always_goes_even_over_the_steps_prefill_budget(model):
    _, tok = model
    backend = CountingBackend([7] * 200, tok.vocab_size, context_length=128)
    engine = Engine(backend, tok, EngineLimits(max_running=2, prefill_chunk=8, step_prefill_tokens=3))
    handle = engine.submit(list(range(10, 20)), SamplingConfig(temperature=0, max_tokens=2))
    while not handle.done:
        engine.step()
    assert [[len(ids) for ids in batch] for batch in backend.batches][:2] == [[8], [2]]


def test_the_kv_budget_makes_sequences_wait_and_refuses_one_that_never_fits(model):
    backend, tok = model
    engine = Engine(backend, tok, EngineLimits(max_running=8, kv_budget_tokens=40))
    params = SamplingConfig(temperature=0, max_tokens=10)
    ids = tok.encode("Once upon a time")
    handles = [engine.submit(ids, params) for _ in range(4)]
    peak = 0
    while not all(h.done for h in handles):
        engine.step()
        snap = engine.snapshot()
        assert snap.kv_used_tokens <= 40
        peak = max(peak, snap.running)
    assert peak == 40 // (len(ids) + 10)
    with pytest.raises(InputError, match="KV budget is 40"):
        engine.submit(ids, SamplingConfig(max_tokens=100))
    with pytest.raises(InputError, match=r"KV budget \(40\) leaves no room for a reply") as refused:
        engine.submit(list(range(1, 41)), SamplingConfig(max_tokens=1))  # no max_tokens helps: not the hint
    assert refused.value.hint == "raise --kv-budget, or shorten the prompt"


def test_cancel_frees_the_cache_at_the_next_step(model):
    _, tok = model
    backend = CountingBackend([7] * 200, tok.vocab_size, context_length=128)
    engine = Engine(backend, tok, EngineLimits(max_running=4))
    params = SamplingConfig(temperature=0, max_tokens=50)
    keep, drop = engine.submit([1, 2, 3], params), engine.submit([4, 5], params)
    engine.step()
    engine.step()
    engine.cancel(drop)
    engine.step()
    assert drop.done and drop.result.reason == "cancelled"
    assert len(backend.released) == 1 and engine.snapshot().running == 1
    assert len(backend.batches[-1]) == 1  # the cancelled sequence took no part in that step
    assert not keep.done


def test_kv_budget_is_tokens_or_a_size():
    with pytest.raises(ConfigError):
        parse_kv_budget("lots", 100)
    assert parse_kv_budget("1MiB", 1024) == 1024
    assert parse_kv_budget("2048", 0) == 2048
    assert parse_kv_budget(None, 10) is None
    with pytest.raises(ConfigError, match="as a size needs"):
        parse_kv_budget("1GiB", 0)


@pytest.mark.parametrize("absurd", ["9" * 400, "9" * 400 + "MiB", "1" + "0" * 30, "1" + "0" * 30 + "TiB"])
def test_an_absurd_kv_budget_is_a_config_error_not_an_internal_one(absurd):
    # 400 nines read as float infinity (or NaN once divided), and int() of it ended the command with
    # "internal error: OverflowError"; 10**30 tokens passed, a budget no machine holds and no int64 counts.
    with pytest.raises(ConfigError, match="is too large to be a budget"):
        parse_kv_budget(absurd, 1024)
    assert parse_kv_budget(str(2**40), 1024) == 2**40  # large but real: kept


def test_queue_full_is_its_own_error(model):
    backend, tok = model
    engine = Engine(backend, tok, EngineLimits(max_running=1, max_queue=2))
    ids = tok.encode("hi")
    for _ in range(3):  # the free slot, then two in the queue
        engine.submit(ids, GREEDY)
    with pytest.raises(QueueFullError, match="2 requests are already waiting for a slot"):
        engine.submit(ids, GREEDY)
    unqueued = Engine(backend, tok, EngineLimits(max_running=1, max_queue=0))
    unqueued.submit(ids, GREEDY)
    with pytest.raises(QueueFullError, match=r"^every slot is taken and nothing may wait for one \(--max-queue 0\)$"):
        unqueued.submit(ids, GREEDY)


def test_slots_the_kv_budget_cannot_fill_are_not_free_either(model):
    """With the KV budget room for one sequence, three of four slots were taken for free: --max-queue 1
    let five requests wait, not one (the queue bound was --parallel - 1 looser than asked)."""
    backend, tok = model
    ids = tok.encode("hi")
    reserve = len(ids) + GREEDY.max_tokens
    engine = Engine(backend, tok, EngineLimits(max_running=4, max_queue=1, kv_budget_tokens=reserve + 5))
    engine.submit(ids, GREEDY)  # the next step starts it
    engine.submit(ids, GREEDY)  # no KV room left beside it: the queue
    with pytest.raises(QueueFullError, match=r"^1 request is already waiting for a slot"):
        engine.submit(ids, GREEDY)
    engine.step()
    assert engine.snapshot().running == 1 and engine.snapshot().waiting == 1
    with pytest.raises(QueueFullError):
        engine.submit(ids, GREEDY)


def test_free_slots_are_not_the_queue(model):
    """Sequences wait for the next step even when a slot is free: those do not fill --max-queue (0 refused
    every request of an idle server, and a burst was turned away with slots free)."""
    backend, tok = model
    engine = Engine(backend, tok, EngineLimits(max_running=2, max_queue=0))
    ids = tok.encode("hi")
    engine.submit(ids, GREEDY)
    engine.submit(ids, GREEDY)
    with pytest.raises(QueueFullError):
        engine.submit(ids, GREEDY)
    engine.step()  # both admitted: still no free slot and no queue
    with pytest.raises(QueueFullError):
        engine.submit(ids, GREEDY)


def test_background_engine_serves_threads_and_stops(model):
    backend, tok = model
    engine = Engine(backend, tok, EngineLimits(max_running=4))
    engine.start()
    results = {}

    def client(i):
        handle = engine.submit(tok.encode(PROMPTS[i]), GREEDY)
        results[i] = list(handle.events(timeout=60))[-1]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.stop(grace_s=5)
    for i in range(4):
        alone = _finished(list(generate(backend, tok, tok.encode(PROMPTS[i]), GREEDY)))
        assert results[i].token_ids == alone.token_ids
    with pytest.raises(QueueFullError, match="shutting down"):
        engine.submit(tok.encode("hi"), GREEDY)


def test_stop_cancels_what_does_not_finish_within_the_grace(model):
    _, tok = model
    backend = CountingBackend([7] * 10_000, tok.vocab_size, context_length=100_000)
    engine = Engine(backend, tok, EngineLimits(max_running=1, kv_budget_tokens=100_000))
    engine.start()
    handle = engine.submit([1, 2], SamplingConfig(temperature=0, max_tokens=50_000, repetition_stop=False))
    engine.stop(grace_s=0.1)
    assert handle.done and handle.result.reason == "cancelled"


def test_caches_are_made_in_the_engines_thread_not_the_submitters(model):
    """A new cache may grow a backend's KV pool (onnx): only the thread that runs steps may do that."""
    _, tok = model
    backend = CountingBackend([7] * 200, tok.vocab_size, context_length=128)
    made_in = []
    original = backend.new_cache
    backend.new_cache = lambda: made_in.append(threading.get_ident()) or original()
    engine = Engine(backend, tok, EngineLimits(max_running=4))
    engine.start()
    handles = []
    submitters = [
        threading.Thread(target=lambda: handles.append(engine.submit([1, 2, 3], SamplingConfig(max_tokens=3))))
        for _ in range(4)
    ]
    for thread in submitters:
        thread.start()
    for thread in submitters:
        thread.join()
    for handle in handles:
        list(handle.events(timeout=30))
    engine_thread = engine._thread.ident
    engine.stop()
    assert len(made_in) == 4 and set(made_in) == {engine_thread}


def test_a_sequence_that_fails_in_the_background_ends_alone_and_the_engine_keeps_serving(model):
    """A seed numpy refuses (past the front doors' checks) ends its own sequence with 'error'; the
    sequence sharing its steps finishes, and so does one submitted afterwards (the thread lives on)."""
    _, tok = model
    backend = CountingBackend([7] * 200, tok.vocab_size, context_length=128)
    engine = Engine(backend, tok, EngineLimits(max_running=4))
    engine.start()
    try:
        good = engine.submit([1, 2, 3], SamplingConfig(temperature=0, max_tokens=5, repetition_stop=False))
        bad = engine.submit([1, 2, 3], SamplingConfig(temperature=0, max_tokens=5, seed=-5))
        assert _finished(list(bad.events(timeout=30))).reason == "error"
        assert isinstance(bad.error, ValueError)
        assert _finished(list(good.events(timeout=30))).reason == "length"
        later = engine.submit([4, 5], SamplingConfig(temperature=0, max_tokens=3, repetition_stop=False))
        assert _finished(list(later.events(timeout=30))).reason == "length"
    finally:
        engine.stop()
    assert len(backend.released) == 3  # the failed sequence's cache went back too


def test_a_failure_outside_any_sequences_decoding_ends_the_running_ones_not_the_thread(model):
    _, tok = model
    backend = CountingBackend([7] * 200, tok.vocab_size, context_length=128)
    original, calls = backend.new_cache, []

    def new_cache():  # the first cache cannot be made (a KV pool that cannot grow)
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("no room for a KV cache")
        return original()

    backend.new_cache = new_cache
    engine = Engine(backend, tok, EngineLimits(max_running=4))
    engine.start()
    try:
        first = engine.submit([1, 2, 3], SamplingConfig(temperature=0, max_tokens=3))
        assert _finished(list(first.events(timeout=30))).reason == "error"
        assert isinstance(first.error, MemoryError)
        second = engine.submit([1, 2, 3], SamplingConfig(temperature=0, max_tokens=3, repetition_stop=False))
        assert _finished(list(second.events(timeout=30))).reason == "length"
    finally:
        engine.stop()


def test_ctrl_c_between_two_events_still_ends_the_reply_with_its_text(model, monkeypatch):
    """KeyboardInterrupt lands in the caller (not in a step) about as often as the caller's share of the
    time: thrown into `generate`, it ends the sequence 'interrupted' with the text so far, as mid-step."""
    from gptcli.cli import remote_run, render

    backend, tok = model
    params = SamplingConfig(temperature=0, max_tokens=40, repetition_stop=False)
    alone = _finished(list(generate(backend, tok, tok.encode(PROMPTS[0]), params)))

    def interrupted_after_three(events, show):
        for _ in range(3):
            next(events)
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "stream_text", interrupted_after_three)
    finished = remote_run.stream_or_exit(generate(backend, tok, tok.encode(PROMPTS[0]), params), show=False)
    assert finished.reason == "interrupted"
    assert finished.token_ids == alone.token_ids[: len(finished.token_ids)] and len(finished.token_ids) >= 3


def test_a_tokenizer_that_outgrows_the_embeddings_is_a_model_error_not_an_index_error(tiny_models, tmp_path):
    """A token added to tokenizer.json without resizing the embeddings: `generate` died with an IndexError."""
    import json
    import re
    import shutil

    from tests.conftest import run_cli

    model = tmp_path / "grown"
    shutil.copytree(tiny_models["llama"], model)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    extra = {"content": "<|x|>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    tokenizer["added_tokens"].append({"id": 10_000, **extra, "special": True})
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    failed = run_cli("generate", "--raw", "a<|x|>b", "-m", str(model), "-n", "2")
    err = failed.stderr.decode()
    assert failed.returncode == 5 and re.search(r"gives token id \d+, past the model's \d+ embeddings", err), err
    assert "Traceback" not in err
    assert run_cli("generate", "--raw", "ab", "-m", str(model), "-n", "2").returncode == 0  # the ids it has: fine


def test_a_max_tokens_past_the_context_says_its_reserve_is_capped_there():
    """A batch line's max_tokens of 100000 under --kv-budget 2000 read 'needs 8192 KV positions (prompt 33 + max
    tokens 100000)': a sum that does not add up, with no word of the context that capped it."""
    from gptcli.engine.limits import kv_reserve

    with pytest.raises(InputError) as capped:
        kv_reserve(33, 100_000, 8192, 2000)
    assert capped.value.message == (
        "this sequence needs 8192 KV positions (prompt 33 + max tokens 100000, up to the context's 8192)"
        " but the KV budget is 2000"
    )
    with pytest.raises(InputError) as plain:
        kv_reserve(33, 3000, 8192, 2000)
    assert (
        plain.value.message
        == "this sequence needs 3033 KV positions (prompt 33 + max tokens 3000) but the KV budget is 2000"
    )
