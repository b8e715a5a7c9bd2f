"""The ONNX backend's native batched step: batching never changes answers, and the KV pool recycles slots."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from gptcli.backends.base import LoadOptions
from gptcli.backends.onnx_backend import OnnxBackend
from gptcli.testing import greedy_ids

PROMPTS = [[3 + (7 * i + 5 * j) % 200 for j in range(2 + 3 * i)] for i in range(8)]  # 2 to 23 tokens


@pytest.fixture(scope="module")
def loaded(tiny_models, tmp_path_factory):
    """Backends by (family, precision), exported once for this module."""
    backends: dict[tuple[str, str], OnnxBackend] = {}

    def get(family: str, precision: str = "fp32") -> OnnxBackend:
        if (family, precision) not in backends:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("GPTCLI_HOME", str(tmp_path_factory.mktemp("onnx-batched-home")))
                options = LoadOptions(device="cpu", dtype="float32", precision=precision)
                backends[(family, precision)] = OnnxBackend.load(tiny_models[family], options)
        return backends[(family, precision)]

    return get


def _mixed_step_matches_forward(backend: OnnxBackend, atol: float) -> None:
    # Eight sequences with different pasts (0 to 23 positions), stepped together with a mix of
    # decode tokens and prefill chunks; each row must equal forward() on a cache with the same history.
    caches, references, batch = [], [], []
    for i, prompt in enumerate(PROMPTS):
        past, new = (prompt, [7 + i]) if i % 3 else (prompt[: len(prompt) // 2], prompt[len(prompt) // 2 :])
        if i == 0:
            past, new = [], prompt  # a fresh sequence's whole prompt
        cache, reference = backend.new_cache(), backend.new_cache()
        if past:
            _, cache = backend.forward(past, cache)
            _, reference = backend.forward(past, reference)
        caches.append(cache)
        references.append((new, reference))
        batch.append((new, cache))
    logits, grown = backend.step(batch)
    assert logits.shape == (8, backend.info.vocab_size) and logits.dtype == np.float32
    for row, ((new, reference), cache) in enumerate(zip(references, grown, strict=True)):
        want, reference = backend.forward(new, reference)
        np.testing.assert_allclose(logits[row], want, atol=atol, rtol=0, err_msg=f"row {row}")
        assert cache is caches[row] and cache.length == reference.length
    # a second, all-decode step on the grown caches (rows of different lengths in one call)
    tokens = [[int(np.argmax(row))] for row in logits]
    again, _ = backend.step(list(zip(tokens, caches, strict=True)))
    for row, (token, (_, reference)) in enumerate(zip(tokens, references, strict=True)):
        want, _ = backend.forward(token, reference)
        np.testing.assert_allclose(again[row], want, atol=atol, rtol=0, err_msg=f"decode row {row}")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_mixed_batch_equals_one_by_one_forward(loaded, family):
    _mixed_step_matches_forward(loaded(family), atol=1e-4)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_batches_equal_one_by_one_forward(loaded, precision):
    _mixed_step_matches_forward(loaded("llama", precision), atol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sequences_joining_and_leaving_decode_exactly_as_alone(loaded, family):
    backend = loaded(family)
    steps = 10
    alone = [greedy_ids(backend, prompt, steps) for prompt in PROMPTS]
    idle = backend.new_cache()  # held but never in the batch: moved out of the way when the batch needs its slot
    _, idle = backend.forward([5, 6, 7], idle)
    joins_at = [0, 0, 1, 1, 2, 3, 5, 9]
    leaves_after = {2: 4}  # sequence 2 stops after 4 tokens and is released: its slot is reused
    caches: dict[int, object] = {}
    produced: dict[int, list[int]] = {i: [] for i in range(8)}
    pending: dict[int, list[int]] = {}
    for step in range(30):
        for i, start in enumerate(joins_at):
            if start == step:
                caches[i], pending[i] = backend.new_cache(), PROMPTS[i]
        active = [i for i in caches if len(produced[i]) < leaves_after.get(i, steps)]
        if not active:
            break
        logits, _ = backend.step([(pending[i], caches[i]) for i in active])
        for row, i in enumerate(active):
            token = int(np.argmax(logits[row]))
            produced[i].append(token)
            pending[i] = [token]
            if len(produced[i]) == leaves_after.get(i, steps):
                backend.release(caches.pop(i))
    assert all(produced[i] == alone[i][: len(produced[i])] for i in range(8)), (produced, alone)
    assert [len(produced[i]) for i in range(8)] == [steps, steps, 4, *[steps] * 5]
    got, _ = backend.forward([8], idle)  # the idle cache's positions survived being moved
    want, _ = backend.forward([5, 6, 7, 8], backend.new_cache())
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_released_or_dropped_cache_gives_its_slot_to_the_next(loaded):
    backend = loaded("gpt2")
    kept = [backend.new_cache() for _ in range(3)]
    slots = backend.pool.slots
    gone = backend.new_cache()
    slot = gone.slot
    backend.release(gone)
    assert gone.slot == -1 and backend.new_cache().slot == slot  # (that one is dropped at once)
    gc.collect()
    assert backend.new_cache().slot == slot  # a cache nobody holds is collected and its slot reused
    assert backend.pool.slots == slots and len({c.slot for c in kept}) == 3
    with pytest.raises(ValueError, match="released"):
        backend.forward([3], gone)
    with pytest.raises(ValueError, match="same cache twice"):
        backend.step([([3], kept[0]), ([4], kept[0])])
    assert backend.info.kv_bytes_per_token == 2 * 2 * 64 * 4  # 2 layers x key and value x 64 wide x fp32


def test_attention_writes_into_the_pool_in_place(loaded):
    # The pool's numpy memory is what ORT reads and writes (no copies): the new positions appear there.
    shared = loaded("llama")
    backend = OnnxBackend(shared.session, shared.info, shared.meta, shared.device)  # a fresh, empty pool
    first, second = backend.new_cache(), backend.new_cache()
    backend.step([([3, 4, 5, 6], first), ([9, 10], second)])
    backend.step([([7], first), ([11], second)])
    keys = backend.pool.blocks[0]  # layer 0 keys [slots, kv_heads, context, head_dim]
    for cache, filled in ((first, 5), (second, 3)):
        assert np.abs(keys[cache.slot, :, :filled]).min(axis=-1).all()  # written
        assert not keys[cache.slot, :, filled:].any()  # never touched past the length


def test_cuda_batches_equal_one_by_one_and_moves_slots_on_the_gpu(tiny_models):
    from gptcli.backends.onnx_backend import cuda_unusable_reason

    reason = cuda_unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    backend = OnnxBackend.load(tiny_models["llama"], LoadOptions(device="cuda", precision="fp16"))
    caches = [backend.new_cache() for _ in PROMPTS]
    backend.release(caches.pop(1))  # a hole at slot 1: the decode rows must be moved together on the GPU
    prompts = PROMPTS[:1] + PROMPTS[2:]
    for prompt, cache in zip(prompts, caches, strict=True):
        backend.forward(prompt, cache)
    logits, _ = backend.step([([5], cache) for cache in caches])
    for prompt, row in zip(prompts, logits, strict=True):
        _, alone = backend.forward(prompt, backend.new_cache())
        want, _ = backend.forward([5], alone)
        assert np.corrcoef(row, want)[0, 1] > 0.999 and np.argmax(row) == np.argmax(want)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_token_prompts_decode_beside_longer_rows(loaded, family):
    backend = loaded(family)
    longer = backend.new_cache()
    backend.forward([3, 4, 5, 6, 7], longer)
    fresh = [backend.new_cache(), backend.new_cache()]
    logits, _ = backend.step([([9], fresh[0]), ([8], longer), ([10], fresh[1])])
    for row, alone in enumerate(([9], [3, 4, 5, 6, 7, 8], [10])):
        want, _ = backend.forward(alone, backend.new_cache())
        np.testing.assert_allclose(logits[row], want, atol=1e-4, rtol=0, err_msg=f"row {row}")
    assert [cache.length for cache in (*fresh, longer)] == [1, 1, 6]
    both, _ = backend.step([([9], backend.new_cache()), ([10], backend.new_cache())])  # every row at position 0
    np.testing.assert_allclose(both, logits[[0, 2]], atol=1e-4, rtol=0)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_a_fresh_slot_commits_only_the_positions_written():
    """The pool's memory is committed in small pages as positions fill, never a 2 MiB page per head row.

    (numpy's zeros asks for huge pages at this size: each 128-token prefill into a fresh slot then zeroed
    360 MB of the default model's pool, 1.1 s instead of 0.17 s.)
    """
    from gptcli.backends.onnx_kvpool import KvPool

    pool = KvPool(blocks=8, kv_heads=3, context=8192, head_dim=64, dtype=np.float32, device="cpu")
    pool._grow(8)  # 8 slots x 8 blocks x 6 MiB, untouched
    before = _resident_bytes()
    for block in pool.blocks:
        block[5, :, :128] = 1.0  # one 128-token prefill into slot 5: 3 head rows of 32 KiB per block
    grown = _resident_bytes() - before
    assert grown < 4 * 2**20, f"{grown / 2**20:.1f} MiB committed for 768 KiB written"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_a_released_slot_gives_its_memory_back():
    """A slot kept its pages after its cache was released (or moved away): the pool stayed at its high-water
    mark, every slot as full as it had ever been, past what --kv-budget lets run (the default model: four
    ended sequences of 2,048 positions held 360 MB)."""
    from gptcli.backends.onnx_kvpool import KvPool

    class Owner:
        slot, length = -1, 0

    pool = KvPool(blocks=8, kv_heads=3, context=8192, head_dim=64, dtype=np.float32, device="cpu")
    gone, kept = Owner(), Owner()
    for owner in (gone, kept):
        pool.acquire(owner)
        owner.length = 2048
        for block in pool.blocks:
            block[owner.slot, :, :2048] = 1.0  # 1.5 MiB per block
    before = _resident_bytes()
    slot = gone.slot
    pool.release(gone)
    freed = before - _resident_bytes()
    assert freed > 10 * 2**20, f"{freed / 2**20:.1f} MiB given back of 12 MiB released"
    assert all(block[kept.slot, :, :2048].min() == 1.0 for block in pool.blocks)  # its neighbour untouched
    again = Owner()
    pool.acquire(again)  # the same slot, empty and usable
    assert again.slot == slot and not pool.blocks[0][slot].any()
    pool.blocks[0][slot, :, :4] = 2.0
    assert pool.blocks[0][slot, 0, 3, 0] == 2.0


def test_the_prefix_cache_on_onnx_slots_answers_as_alone(loaded, tiny_models):
    """Cached caches keep their pool slots (and are moved like any other) while others decode beside them."""
    from gptcli.config import SamplingConfig
    from gptcli.engine import Engine, EngineLimits, generate, run_all
    from gptcli.tokenizer import Tokenizer

    backend, tok = loaded("llama"), Tokenizer(tiny_models["llama"])
    greedy = SamplingConfig(temperature=0, max_tokens=8)
    base = [3 + (11 * j) % 190 for j in range(14)]
    prompts = [*([*base, 40 + i, 50 + i] for i in range(4)), [9, 8, 7, 6, 5]]
    alone = [list(generate(backend, tok, ids, greedy))[-1].token_ids for ids in prompts]
    engine = Engine(backend, tok, EngineLimits(max_running=3, prefill_chunk=4, prefix_cache=3))
    list(run_all(engine, [(base, greedy)]))  # fills the prefix cache
    finished = {}
    for index, event in run_all(engine, [(ids, greedy) for ids in prompts]):
        finished[index] = event
    assert [finished[i].token_ids for i in range(len(prompts))] == alone
    # Three arrive together with the cache's prompt: each gets a copy of its 12 whole-chunk positions.
    assert [finished[i].stats.cached_tokens for i in range(len(prompts))] == [12, 12, 12, 12, 0]
