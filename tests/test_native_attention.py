"""The lean engine's own attention (backends/native_attention.py, int8_native.c), decode rows and prompt chunks:
SDPA's numbers within float32 rounding, on every kernel path this CPU runs; each sequence's bits whatever else is
in the call and on any thread count; and SDPA wherever it cannot be had."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptcli.backends import int8_native, native_build
from gptcli.backends.lean_base import LeanCache
from gptcli.backends.native_attention import NativeAttention, native_attention_for
from gptcli.hardware import cpu_flags
from tests.test_int8_native import needs_build

pytestmark = needs_build


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> list:
    """The library of every kernel path this CPU runs (AVX-512, AVX-VNNI, AVX2), built once for this module."""
    folder, cc = tmp_path_factory.mktemp("kernels"), native_build.compiler()
    return [
        native_build.built_library(
            int8_native.SOURCE, cc, (*int8_native.BUILD_FLAGS, *flags), folder, name, "gptcli_int8_isa"
        )
        for needs, flags, name in int8_native.ISA_BUILDS
        if set(needs) <= cpu_flags()
    ]


def _caches(kv_heads: int, head_dim: int, lengths: list[int], dtype: torch.dtype, first: int = 0) -> list[LeanCache]:
    """Caches of `lengths` positions, the i-th made as in any call where it is the i-th (`first`: its index)."""
    made = []
    for i, length in enumerate(lengths, start=first):
        generator = torch.Generator().manual_seed(i)
        capacity = length + 1 + 7 * i  # each its own capacity: the head stride differs per sequence
        keys = torch.randn(kv_heads, capacity, head_dim, generator=generator).to(dtype)
        values = torch.randn(kv_heads, capacity, head_dim, generator=generator).to(dtype)
        made.append(LeanCache([torch.zeros_like(keys), keys], [torch.zeros_like(values), values], length))
    return made


def _inputs(heads: int, kv_heads: int, head_dim: int, count: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(99)
    q = torch.randn(heads, count, head_dim, generator=generator).to(dtype)
    k, v = torch.randn(2, kv_heads, count, head_dim, generator=generator).to(dtype)
    return q, k, v


def _sdpa_chunk(q, cache: LeanCache, start: int, window: int | None) -> torch.Tensor:
    """What SDPA computes for a chunk (or a decode row) written at `start`, in float32: each position over itself and
    the ones before it."""
    end = start + q.shape[1]
    first = 0 if window is None else max(0, start + 1 - window)
    rows, cols = torch.arange(start, end)[:, None], torch.arange(first, end)[None, :]
    mask = cols <= rows if window is None else (cols <= rows) & (cols > rows - window)
    keys, values = cache.keys[1][:, first:end].float(), cache.values[1][:, first:end].float()
    out = F.scaled_dot_product_attention(q.float()[None], keys[None], values[None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(q.shape[1], -1)


# (heads, kv heads, head dim): the default model's; one key head of 256 (Gemma 3 270M); a head dim that fits no
# vector (the scalar loops); groups of 9 and 7 query heads (passes of 8 + 1, and 4 + 3: Qwen2.5 0.5B); no grouping.
SHAPES = [(9, 3, 64), (4, 1, 256), (4, 2, 12), (18, 2, 16), (14, 2, 64), (2, 2, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}-{kv}-{hd}" for h, kv, hd in SHAPES])
def test_it_computes_what_sdpa_computes_on_every_path(libraries, shape, window, dtype):
    heads, kv_heads, head_dim = shape
    lengths = [0, 5, 700, 33]  # an empty cache, inside the window and past it
    q, k, v = _inputs(heads, kv_heads, head_dim, len(lengths), dtype)
    assert libraries
    for library in libraries:
        attend = NativeAttention(library, heads, kv_heads, head_dim, head_dim**-0.5)
        caches = _caches(kv_heads, head_dim, lengths, dtype)
        out = attend.decode(q, k, v, caches, 1, window)
        assert out.dtype == dtype and out.shape == (len(lengths), heads * head_dim)
        for row, cache in enumerate(caches):
            assert torch.equal(cache.keys[1][:, cache.length], k[:, row])  # the new rows, written at the length
            assert torch.equal(cache.values[1][:, cache.length], v[:, row])
            error = (out[row].float() - _sdpa_chunk(q[:, [row]], cache, cache.length, window)[0]).abs().max().item()
            assert error < (1e-5 if dtype == torch.float32 else 2e-2), (library, row, error)
            assert cache.length == lengths[row]  # the step advances it, not the attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_sequence_gets_the_same_bits_alone_in_company_and_on_any_thread_count(libraries, dtype):
    heads, kv_heads, head_dim = 9, 3, 64
    lengths = [3000, 1, 64, 257]
    q, k, v = _inputs(heads, kv_heads, head_dim, len(lengths), dtype)
    assert libraries
    for library in libraries:
        attend = NativeAttention(library, heads, kv_heads, head_dim, 0.125)
        together = attend.decode(q, k, v, _caches(kv_heads, head_dim, lengths, dtype), 1, None)
        for row, length in enumerate(lengths):
            alone = attend.decode(
                q[:, [row]], k[:, [row]], v[:, [row]], _caches(kv_heads, head_dim, [length], dtype, row), 1, None
            )
            assert torch.equal(alone[0], together[row])
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one_thread = attend.decode(q, k, v, _caches(kv_heads, head_dim, lengths, dtype), 1, None)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(one_thread, together)


# (past positions, chunk positions, window): a first chunk, one after a past, one whose rows reach back past the
# window, a chunk shorter than a block of 8 rows, and one row
CHUNKS = [(0, 37, None), (100, 13, None), (300, 64, 16), (0, 5, 3), (50, 1, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}-{kv}-{hd}" for h, kv, hd in SHAPES])
def test_a_prompt_chunk_is_what_sdpa_computes_with_the_causal_mask_on_every_path(libraries, shape, dtype):
    heads, kv_heads, head_dim = shape
    for library in libraries:
        attend = NativeAttention(library, heads, kv_heads, head_dim, head_dim**-0.5)
        for start, count, window in CHUNKS:
            (cache,) = _caches(kv_heads, head_dim, [start + count + 3], dtype)
            cache.length = start
            q, k, v = _inputs(heads, kv_heads, head_dim, count, dtype)
            out = attend.prefill(q, k, v, cache, 1, window)
            assert out.dtype == dtype and out.shape == (count, heads * head_dim)
            assert torch.equal(cache.keys[1][:, start : start + count], k) and cache.length == start
            assert torch.equal(cache.values[1][:, start : start + count], v)
            error = (out.float() - _sdpa_chunk(q, cache, start, window)).abs().max().item()
            assert error < (1e-5 if dtype == torch.float32 else 2e-2), (library, start, count, window, error)


def test_a_prompt_chunk_gets_the_same_bits_on_any_thread_count(libraries):
    heads, kv_heads, head_dim, start, count = 9, 3, 64, 700, 77
    q, k, v = _inputs(heads, kv_heads, head_dim, count, torch.bfloat16)
    for library in libraries:
        attend = NativeAttention(library, heads, kv_heads, head_dim, 0.125)
        outs = []
        for threads in (2, 1):
            (cache,) = _caches(kv_heads, head_dim, [start + count], torch.bfloat16)
            cache.length = start
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                outs.append(attend.prefill(q, k, v, cache, 1, None))
            finally:
                torch.set_num_threads(before)
        assert torch.equal(outs[0], outs[1])


def test_sdpa_stays_where_the_native_one_cannot_run(monkeypatch):
    cpu = torch.device("cpu")
    assert native_attention_for(cpu, torch.float32, 9, 3, 64, 0.125) is not None
    assert native_attention_for(cpu, torch.float16, 9, 3, 64, 0.125) is None  # no float16 loads
    assert native_attention_for(torch.device("cuda"), torch.float32, 9, 3, 64, 0.125) is None
    assert native_attention_for(cpu, torch.float32, 9, 4, 64, 0.125) is None  # heads that no key head groups
    monkeypatch.setenv(int8_native.OFF_SWITCH, "0")
    assert native_attention_for(cpu, torch.float32, 9, 3, 64, 0.125) is None


def test_a_model_decodes_what_it_decodes_with_sdpa(tiny_models, monkeypatch):
    """The tiny llama, lean engine, float32: a prompt read in chunks, then decode steps; every logit with gptcli's
    attention is SDPA's within float32 rounding (the same tokens fed to both), and so is a scored text's."""
    from gptcli.backends.base import LoadOptions
    from gptcli.backends.torch_backend import TorchBackend

    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    tokens = [int(t) for t in torch.randint(3, 60, (48,), generator=torch.Generator().manual_seed(1))]

    def decode(native: bool) -> torch.Tensor:
        monkeypatch.setenv(int8_native.OFF_SWITCH, "1" if native else "0")
        lean = TorchBackend.load(tiny_models["llama"], LoadOptions(device="cpu", dtype="float32")).engine.lean
        assert (lean.native_attention() is not None) == native
        cache = lean.new_cache()
        rows = [lean.step([(tokens[:8], cache)])[0], lean.step([(tokens[8:20], cache)])[0]]
        rows += [lean.step([([token], cache)])[0] for token in tokens[20:]]
        return torch.cat([torch.stack(rows), lean.score(tokens, lean.new_cache())])

    native, sdpa = decode(True), decode(False)
    assert (native - sdpa).abs().max().item() < 1e-4
    assert torch.equal(native.argmax(-1), sdpa.argmax(-1))


def test_a_bad_off_switch_fails_the_load_not_the_first_step(tiny_models, monkeypatch):
    from gptcli.backends.base import LoadOptions
    from gptcli.backends.torch_backend import TorchBackend
    from gptcli.errors import ConfigError

    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    monkeypatch.setenv(int8_native.OFF_SWITCH, "maybe")
    with pytest.raises(ConfigError, match="GPTCLI_NATIVE_KERNELS must be 1 or 0"):
        TorchBackend.load(tiny_models["llama"], LoadOptions(device="cpu", dtype="float32"))
