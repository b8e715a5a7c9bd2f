"""The model folder format: Architecture.from_config, the checks against the safetensors headers, the sidecar."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from gptcli import hf
from gptcli.errors import ModelError
from gptcli.hf import Architecture

GPT2_CONFIG = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 64,
    "n_positions": 96,
    "n_inner": None,
    "vocab_size": 300,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
}
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "vocab_size": 300,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def test_gpt2_config():
    arch = Architecture.from_config(GPT2_CONFIG)
    assert (arch.family, arch.architecture, arch.layers, arch.hidden) == ("gpt2", "GPT2LMHeadModel", 2, 64)
    assert (arch.heads, arch.kv_heads, arch.head_dim) == (2, 2, 32)
    assert arch.intermediate == 4 * 64  # n_inner null: GPT-2's default
    assert (arch.vocab, arch.context) == (300, 96)
    assert (arch.norm, arch.norm_eps, arch.activation) == ("layernorm", 1e-5, "gelu_new")
    assert arch.tied and arch.qkv_bias and arch.mlp_bias
    assert arch.rope_scaling is None and arch.fast_path_refusal("lean") is None
    assert arch.fast_path_refusal("onnx") is None


def test_llama_config():
    arch = Architecture.from_config(LLAMA_CONFIG)
    assert (arch.family, arch.layers, arch.hidden, arch.intermediate) == ("llama", 2, 64, 128)
    assert (arch.heads, arch.kv_heads, arch.head_dim, arch.vocab, arch.context) == (4, 2, 16, 300, 128)
    assert (arch.norm, arch.norm_eps, arch.rope_theta) == ("rmsnorm", 1e-6, 50000.0)
    assert arch.tied and not arch.qkv_bias and not arch.mlp_bias
    assert arch.fast_path_refusal("lean") is None and arch.fast_path_refusal("onnx") is None
    assert (arch.layer_types, arch.sliding_window, arch.qk_norm, arch.norm_offset) == ((), None, False, 0.0)


def test_rope_scaling_and_quirks_keep_the_fast_paths_away():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaled = Architecture.from_config({**LLAMA_CONFIG, "rope_parameters": llama3})
    assert scaled.rope_scaling == llama3
    assert scaled.fast_path_refusal("lean") is None  # the lean engine computes llama3 frequencies
    assert scaled.fast_path_refusal("onnx") is None  # so does the exporter (baked into the graph's tables)
    incomplete = Architecture.from_config({**LLAMA_CONFIG, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    assert "rope type 'llama3' needs 'low_freq_factor'" in incomplete.fast_path_refusal("lean")
    dynamic = Architecture.from_config({**LLAMA_CONFIG, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert dynamic.fast_path_refusal("lean") == "rope_scaling: rope type 'dynamic' is not supported"
    quirky = Architecture.from_config({**GPT2_CONFIG, "scale_attn_by_inverse_layer_idx": True})
    assert quirky.quirks == ("scale_attn_by_inverse_layer_idx=True",) and quirky.fast_path_refusal("lean")


def test_an_unknown_family_is_other_not_an_error():
    arch = Architecture.from_config({"architectures": ["BloomForCausalLM"], "model_type": "bloom", "hidden_size": 64})
    assert arch.family == "other" and arch.hidden == 64 and arch.layers == 0
    assert "BloomForCausalLM is not a model family the lean path knows" in arch.fast_path_refusal("lean")
    per_layer = Architecture.from_config({"model_type": "openelm", "num_attention_heads": [4, 8], "vocab_size": 9})
    assert per_layer.heads == 0 and per_layer.vocab == 9  # a list is another family's convention, not an error


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({**GPT2_CONFIG, "n_layer": -1}, "n_layer"),
        ({**GPT2_CONFIG, "n_embd": 1e9}, "n_embd"),
        ({**LLAMA_CONFIG, "vocab_size": 0}, "vocab_size"),
        ({**LLAMA_CONFIG, "num_attention_heads": True}, "num_attention_heads"),
        ({**LLAMA_CONFIG, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({**LLAMA_CONFIG, "hidden_size": 66, "head_dim": None}, "hidden_size"),
        ({**LLAMA_CONFIG, "rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"model_type": "qwen2", "num_hidden_layers": -3}, "num_hidden_layers"),  # any family
    ],
)
def test_impossible_values_are_model_errors_naming_file_and_key(config, key):
    with pytest.raises(ModelError, match=rf"^some/config\.json: {key} = .* is impossible") as info:
        Architecture.from_config(config, source="some/config.json")
    assert info.value.exit_code == 5


def test_a_missing_size_is_a_model_error():
    with pytest.raises(ModelError, match=r"config\.json: intermediate_size is missing"):
        Architecture.from_config({k: v for k, v in LLAMA_CONFIG.items() if k != "intermediate_size"})


def _with_config(tiny_models, tmp_path, family, **changes):
    folder = tmp_path / family
    shutil.copytree(tiny_models[family], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
    return folder


@pytest.mark.parametrize(
    ("family", "changes", "key"),
    [
        ("gpt2", {"n_embd": 128, "n_head": 2}, "n_embd"),
        ("gpt2", {"vocab_size": 7}, "vocab_size"),
        ("gpt2", {"n_layer": 3}, "n_layer"),
        ("llama", {"num_key_value_heads": 4}, "num_key_value_heads"),
        ("llama", {"num_hidden_layers": 1}, "num_hidden_layers"),
        ("llama", {"intermediate_size": 64}, "intermediate_size"),
    ],
)
def test_sizes_that_disagree_with_the_safetensors_headers(tiny_models, tmp_path, family, changes, key):
    folder = _with_config(tiny_models, tmp_path, family, **changes)
    with pytest.raises(ModelError, match=rf"{re.escape(str(folder / 'config.json'))}: {key} .*disagrees with") as info:
        hf.read_architecture(folder)
    assert info.value.exit_code == 5
    assert hf.read_architecture(tiny_models[family]).family == family  # the untouched folder passes


def test_architectures_given_as_one_string_names_the_family(tiny_models, tmp_path):
    folder = _with_config(tiny_models, tmp_path, "llama", architectures="LlamaForCausalLM")
    arch = hf.read_architecture(folder)  # was: architecture "L", family "other"
    assert (arch.architecture, arch.family) == ("LlamaForCausalLM", "llama")


def test_a_family_without_known_shapes_cannot_claim_more_layers_than_its_weights_hold(tiny_models, tmp_path):
    other = {"architectures": ["GraniteForCausalLM"], "model_type": "granite"}
    folder = _with_config(tiny_models, tmp_path, "llama", **other, num_hidden_layers=100_000)
    with pytest.raises(ModelError, match="100000 layers disagree with the weights, which hold 2"):
        hf.read_architecture(folder)  # was: unchecked, and transformers built 100,000 layers
    assert hf.read_architecture(_with_config(tiny_models, tmp_path / "ok", "llama", **other)).family == "other"


def test_the_check_reads_headers_only(tiny_models, tmp_path, monkeypatch):
    """No tensor is read or allocated: the check runs from the headers, the lean engine never loads."""
    import safetensors
    import torch

    from gptcli.backends import torch_lean

    folder = _with_config(tiny_models, tmp_path, "llama", hidden_size=128, head_dim=32)
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("a tensor was opened"))
    monkeypatch.setattr(torch_lean, "load_tensors", lambda *a, **k: pytest.fail("tensors were allocated"))
    with pytest.raises(ModelError, match="hidden_size disagrees"):
        hf.read_architecture(folder)
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ModelError, match="hidden_size disagrees"):
        torch_lean.build(cfg, hf.weight_files(folder), "cpu", torch.float32)


def test_resolving_a_folder_with_an_impossible_config_is_exit_5(tiny_models, tmp_path):
    from gptcli.models import resolve_model

    folder = _with_config(tiny_models, tmp_path, "gpt2", n_layer=-1)
    with pytest.raises(ModelError, match=r"config\.json: n_layer = -1 is impossible") as info:
        resolve_model(str(folder))
    assert info.value.exit_code == 5


@pytest.mark.parametrize("factor", [0, -2, "x", True])
def test_a_rope_scaling_factor_that_is_not_positive_is_impossible(tiny_models, tmp_path, factor):
    folder = _with_config(tiny_models, tmp_path, "llama", rope_scaling={"rope_type": "linear", "factor": factor})
    with pytest.raises(ModelError, match=r"rope_scaling\.factor = .* is impossible \(must be a positive number\)"):
        hf.read_architecture(folder)  # was: accepted, and every logit NaN (an empty reply, exit 0)


def test_a_header_whose_shape_outgrows_its_bytes_is_corrupt(tmp_path):
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ModelError, match=r"corrupt safetensors file .*needs 4000000000000 bytes"):
        hf.safetensors_header(path)


def _safetensors(path, header, data: int):
    import struct

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    return path


@pytest.mark.parametrize(
    ("header", "said"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        ({"w": {"dtype": "XQ", "shape": [2], "data_offsets": [0, 8]}}, "dtype 'XQ', not one gptcli can read"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
            },
            "has a gap at byte 8",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            "overlaps at byte 4",
        ),
    ],
)
def test_a_header_the_safetensors_library_would_refuse_is_corrupt_here(tmp_path, header, said):
    path = _safetensors(tmp_path / "model.safetensors", header, 24)
    with pytest.raises(ModelError, match=re.escape(said)):
        hf.safetensors_header(path)


def test_model_json_files_are_bounded_and_a_pipe_is_not_waited_for(tiny_models, tmp_path):
    import os

    from gptcli.tokenizer import MAX_TOKENIZER_BYTES, Tokenizer

    folder = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], folder)
    with (folder / "tokenizer.json").open("r+b") as handle:
        handle.truncate(MAX_TOKENIZER_BYTES + 1)  # sparse: no disk, and nothing read
    with pytest.raises(ModelError, match=r"tokenizer\.json: over 64 MiB"):
        Tokenizer(folder)
    with (folder / "config.json").open("r+b") as handle:
        handle.truncate(3 << 30)  # was read whole: 6 GB of RSS
    with pytest.raises(ModelError, match=r"config\.json: over 16 MiB"):
        hf.read_config(folder)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    with pytest.raises(ModelError, match=r"config\.json: not a regular file"):
        hf.read_config(folder)
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    with pytest.raises(ModelError, match=r"model\.safetensors is not a regular file"):
        hf.weight_files(folder)


def test_header_tensors_name_their_file(tiny_models):
    tensors = list(hf.header_tensors(tiny_models["llama"]))
    assert tensors and all(t.file.name == "model.safetensors" for t in tensors)
    embed = next(t for t in tensors if t.name == "model.embed_tokens.weight")
    assert embed.count == embed.shape[0] * embed.shape[1] and embed.dtype == "F32"


def test_source_sidecar_round_trip(tmp_path):
    assert hf.read_source(tmp_path) is None and not hf.has_source(tmp_path)
    hf.write_source(tmp_path, "hub:org/name")
    assert hf.read_source(tmp_path) == "hub:org/name" and hf.has_source(tmp_path)
    (tmp_path / hf.SOURCE_FILE).write_text("{not json")
    assert hf.read_source(tmp_path) is None
