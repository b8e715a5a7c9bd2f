import numpy as np
import pytest

from gptcli.backends import int8_native
from gptcli.backends.base import LoadOptions
from gptcli.backends.torch_backend import TorchBackend
from gptcli.config import SamplingConfig
from gptcli.decoding import Finished
from gptcli.engine import generate
from gptcli.testing import check_backend_contract
from gptcli.tokenizer import Tokenizer

CPU32 = LoadOptions(device="cpu", dtype="float32")


@pytest.fixture(params=["lean", "hf"])
def impl(request, monkeypatch):
    """Run a test against both torch engines."""
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", request.param)
    return request.param


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_torch_backend_passes_the_contract(tiny_models, family, impl):
    backend = check_backend_contract(TorchBackend, tiny_models[family])
    assert backend.implementation == impl


@pytest.mark.parametrize("value", ["HF", "transformers", " lean2", "x" * 100_000])
def test_an_unknown_torch_impl_is_a_config_error_not_silently_auto(tiny_models, monkeypatch, value):
    """GPTCLI_TORCH_IMPL=HF ran the lean engine without a word (anything but hf and lean meant auto)."""
    from gptcli.errors import ConfigError

    monkeypatch.setenv("GPTCLI_TORCH_IMPL", value)
    with pytest.raises(ConfigError, match="GPTCLI_TORCH_IMPL must be auto, hf or lean, got ") as caught:
        TorchBackend.load(tiny_models["llama"], CPU32)
    assert len(caught.value.message) < 300  # a long value is quoted short


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lean_engine_matches_transformers_logits_while_the_cache_grows(tiny_models, family, monkeypatch):
    from gptcli.backends import torch_lean

    monkeypatch.setattr(torch_lean, "INITIAL_CACHE", 4)  # force several regrowths
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    lean = TorchBackend.load(tiny_models[family], CPU32)
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "hf")
    hf = TorchBackend.load(tiny_models[family], CPU32)
    lean_cache, hf_cache = lean.new_cache(), hf.new_cache()
    chunks = [[5, 9, 14, 3, 7], [11], [12], [40, 41, 42, 43, 44, 45, 46], *[[i] for i in range(50, 70)]]
    for chunk in chunks:
        a, lean_cache = lean.forward(chunk, lean_cache)
        b, hf_cache = hf.forward(chunk, hf_cache)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    lean_cache = lean.truncate(lean_cache, 6)
    hf_cache = hf.truncate(hf_cache, 6)
    a, _ = lean.forward([99, 98], lean_cache)
    b, _ = hf.forward([99, 98], hf_cache)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_ids_match_transformers_generate(tiny_models, family, impl):
    import torch
    from transformers import AutoModelForCausalLM

    folder = tiny_models[family]
    tokenizer = Tokenizer(folder)
    prompt = tokenizer.encode("Once upon a time", add_special_tokens=True)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    max_new = 40
    expected = reference.generate(
        torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()

    backend = TorchBackend.load(folder, CPU32)
    tokenizer.eos_ids = frozenset()  # the reference ignores EOS too
    events = list(generate(backend, tokenizer, prompt, SamplingConfig(temperature=0, max_tokens=max_new)))
    final = events[-1]
    assert isinstance(final, Finished)
    assert list(final.token_ids) == expected
    assert len(set(expected)) > 3  # not a degenerate repeat of one token


def test_threads_option_is_applied(tiny_models):
    import torch

    before = torch.get_num_threads()
    try:
        TorchBackend.load(tiny_models["gpt2"], LoadOptions(device="cpu", threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bfloat16_runs_and_reports_dtype(tiny_models, impl):
    backend = TorchBackend.load(tiny_models["llama"], LoadOptions(device="cpu", dtype="bfloat16"))
    assert backend.info.dtype == "bfloat16"
    logits, _ = backend.forward([1, 2, 3], backend.new_cache())
    assert logits.dtype == np.float32
    reference = TorchBackend.load(tiny_models["llama"], CPU32)
    expected, _ = reference.forward([1, 2, 3], reference.new_cache())
    assert np.abs(logits - expected).max() < 0.05 * np.abs(expected).max()


def test_cuda_without_gpu_is_a_backend_error(tiny_models):
    import torch

    from gptcli.errors import BackendError

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert TorchBackend.unavailable_reason("cuda") == "CUDA requested but no GPU is available"
    with pytest.raises(BackendError):
        TorchBackend.load(tiny_models["llama"], LoadOptions(device="cuda"))


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_cuda_greedy_matches_cpu(tiny_models):
    folder = tiny_models["llama"]
    cpu = TorchBackend.load(folder, CPU32)
    gpu = TorchBackend.load(folder, LoadOptions(device="cuda", dtype="float32"))
    a, _ = cpu.forward([1, 2, 3, 4], cpu.new_cache())
    b, _ = gpu.forward([1, 2, 3, 4], gpu.new_cache())
    np.testing.assert_allclose(a, b, atol=1e-3)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_cuda_float16_decode_keeps_off_cudnn_attention(tiny_models):
    """cuDNN's attention plans each new key length, every decode step: 79 ms a step against 17 on an H200."""
    import torch

    gpu = TorchBackend.load(tiny_models["llama"], LoadOptions(device="cuda", dtype="float16"))
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    cpu = TorchBackend.load(tiny_models["llama"], CPU32)
    prompt, want = [1, 2, 3, 4], []
    for backend in (cpu, gpu):
        logits, cache = backend.forward(prompt, backend.new_cache())
        for _ in range(6):  # a decode step at each new length
            logits, cache = backend.forward([int(np.argmax(logits))], cache)
        want.append(logits)
    assert np.corrcoef(want[0], want[1])[0, 1] > 0.999


def test_lean_path_never_imports_transformers(tiny_models):
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from gptcli.backends.torch_backend import TorchBackend; "
        "from gptcli.backends.base import LoadOptions; "
        f"b = TorchBackend.load(Path({str(tiny_models['llama'])!r}), LoadOptions(device='cpu')); "
        "b.forward([1, 2, 3], b.new_cache()); print(b.implementation, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["lean", "False"]


def test_bfloat16_decode_attention_groups_query_heads_like_sdpa_gqa(tiny_models, monkeypatch):
    """bf16 decode attends per key-head group (lean_base._attend); it must equal SDPA's own GQA."""
    import torch
    import torch.nn.functional as F

    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    lean = TorchBackend.load(tiny_models["llama"], LoadOptions(device="cpu", dtype="bfloat16")).engine.lean
    assert lean.heads > lean.kv_heads > 1
    cache = lean.new_cache()
    generator = torch.Generator().manual_seed(0)
    past = torch.randn(lean.kv_heads, 2, 40, lean.head_dim, generator=generator).to(torch.bfloat16)
    cache.keys[0][:, :40], cache.values[0][:, :40], cache.length = past[:, 0], past[:, 1], 40
    q = torch.randn(lean.heads, 1, lean.head_dim, generator=generator).to(torch.bfloat16)
    kv = torch.randn(lean.kv_heads, 2, 1, lean.head_dim, generator=generator).to(torch.bfloat16)
    with torch.inference_mode():
        out = lean._attend(q, kv[:, 0], kv[:, 1], 0, cache)
        keys, values = cache.keys[0][:, :41].float(), cache.values[0][:, :41].float()
        expected = F.scaled_dot_product_attention(q.float()[None], keys[None], values[None], enable_gqa=True)
    expected = expected[0].transpose(0, 1).reshape(1, -1)
    assert out.shape == expected.shape
    assert (out.float() - expected).abs().max() < 0.02


@pytest.mark.parametrize("native", [True, False], ids=["native", "sdpa"])
@pytest.mark.parametrize("window", [None, 6])
def test_decode_rows_attend_with_the_numbers_of_each_sequence_alone(tiny_models, monkeypatch, window, native):
    """A decode-only step's attention (the native decode attention, or `_attend_decode_rows` where there is none)
    is bit-identical to `_attend` per sequence."""
    import torch

    from gptcli.backends.lean_base import Span

    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    if not native:
        monkeypatch.setenv("GPTCLI_NATIVE_KERNELS", "0")
    elif isinstance(int8_native.native_kernel(), str):
        pytest.skip(f"no native library here: {int8_native.native_kernel()}")
    lean = TorchBackend.load(tiny_models["llama"], CPU32).engine.lean
    assert lean.heads > lean.kv_heads > 1
    lean.windows = [window] * lean.num_layers
    generator = torch.Generator().manual_seed(0)
    lengths = [0, 3, 11, 40]  # an empty cache, inside the window and past it

    def caches() -> list:
        made = []
        for length in lengths:
            cache = lean.new_cache()
            past = torch.randn(lean.kv_heads, 2, length, lean.head_dim, generator=torch.Generator().manual_seed(length))
            cache.keys[1][:, :length], cache.values[1][:, :length], cache.length = past[:, 0], past[:, 1], length
            made.append(cache)
        return made

    q = torch.randn(lean.heads, len(lengths), lean.head_dim, generator=generator)
    k, v = torch.randn(2, lean.kv_heads, len(lengths), lean.head_dim, generator=generator)
    with torch.inference_mode():
        together_caches, alone_caches = caches(), caches()
        spans = [Span(i, i + 1, cache) for i, cache in enumerate(together_caches)]
        together = lean._attend_spans(q, k, v, 1, spans)
        alone = torch.cat([lean._attend(q[:, [i]], k[:, [i]], v[:, [i]], 1, c) for i, c in enumerate(alone_caches)])
    assert (lean.native_attention() is not None) == native
    assert torch.equal(together, alone)
    for a, b, length in zip(together_caches, alone_caches, lengths, strict=True):
        assert torch.equal(a.keys[1][:, : length + 1], b.keys[1][:, : length + 1])
        assert torch.equal(a.values[1][:, : length + 1], b.values[1][:, : length + 1])


def test_a_decode_only_step_takes_the_decode_rows_path(tiny_models, monkeypatch):
    """Without the native decode attention, several one-token sequences go through `_attend_decode_rows`; a step
    with a prefill chunk does not."""
    from gptcli.backends import lean_base

    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    monkeypatch.setenv("GPTCLI_NATIVE_KERNELS", "0")
    lean = TorchBackend.load(tiny_models["llama"], CPU32).engine.lean
    calls = []
    real = lean_base.LeanModel._attend_decode_rows
    monkeypatch.setattr(lean_base.LeanModel, "_attend_decode_rows", lambda self, *a: calls.append(1) or real(self, *a))
    first, second = lean.new_cache(), lean.new_cache()
    lean.step([([5, 6], first), ([7], second)])
    assert calls == []
    lean.step([([8], first), ([9], second)])
    assert len(calls) == lean.num_layers


def test_batched_steps_of_many_row_counts_do_not_grow_memory_for_ever(tiny_models):
    """A server's steps have as many row counts as its prompts have lengths; oneDNN compiled and kept a kernel
    per shape (1,024 per cache), so RSS grew by ~2 MB per new row count here (270 MB over this test). Bounded now.
    In a fresh process: oneDNN reads its cache sizes once."""
    import subprocess
    import sys

    code = f"""
import sys
from pathlib import Path
from gptcli.backends.base import LoadOptions
from gptcli.backends.torch_backend import TorchBackend

def rss_kb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])

lean = TorchBackend.load(Path({str(tiny_models["llama"])!r}), LoadOptions(device="cpu", dtype="float32")).engine.lean
assert lean.context_length > 115
def step(rows):  # two sequences, rows tokens in all (each starts a fresh cache)
    lean.step([([5] * (rows // 2), lean.new_cache()), ([7] * (rows - rows // 2), lean.new_cache())])
for rows in range(2, 102):  # past any bounded cache's size
    step(rows)
before = rss_kb()
for rows in range(102, 230):
    step(rows)
print((rss_kb() - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mb = int(out.stdout.split()[-1])
    assert grown_mb < 40, f"RSS grew {grown_mb} MB over 128 new row counts"
