"""The model families on the torch lean engine: Qwen2, Qwen3, Mistral, Gemma 3 text, Phi-3, and rope scaling.

Each tiny random model is built from transformers' own config and model classes (tests/family_models.py);
transformers' engine (GPTCLI_TORCH_IMPL=hf) is the reference: the same logits within 1e-4 (fp32) while the
cache grows past the sliding window, the same greedy tokens, and a batched step equal to each sequence alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptcli.backends.base import LoadOptions, batched_step
from gptcli.backends.torch_backend import TorchBackend
from gptcli.errors import ModelError
from gptcli.hf import Architecture, read_architecture
from gptcli.testing import check_backend_contract, greedy_ids
from tests.family_models import FAMILY_MODELS, ROPE_VARIANTS, WINDOW, build_model, build_rope_variant

CPU32 = LoadOptions(device="cpu", dtype="float32")
FAMILIES = list(FAMILY_MODELS)
IMPLEMENTED_ROPE = ["linear", "llama3", "yarn", "longrope"]
# Chunks that take the cache past the window: a 20-token prefill, decode steps, an 11-token chunk, more steps.
CHUNKS = [list(range(3, 23)), [30], [31], list(range(40, 51)), *[[i] for i in range(60, 75)]]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("family-models")
    folders = {family: build_model(root / family, family) for family in FAMILIES}
    folders.update({f"rope-{v}": build_rope_variant(root / f"rope-{v}", v) for v in ROPE_VARIANTS})
    return folders


def _engines(folder, monkeypatch) -> tuple[TorchBackend, TorchBackend]:
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "auto")
    lean = TorchBackend.load(folder, CPU32)
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "hf")
    hf = TorchBackend.load(folder, CPU32)
    assert (lean.implementation, hf.implementation) == ("lean", "hf")
    assert lean.fallback_reason is None
    return lean, hf


def _assert_same_logits_while_the_cache_grows(lean: TorchBackend, hf: TorchBackend) -> None:
    lean_cache, hf_cache = lean.new_cache(), hf.new_cache()
    for chunk in CHUNKS:
        a, lean_cache = lean.forward(chunk, lean_cache)
        b, hf_cache = hf.forward(chunk, hf_cache)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f"at position {lean_cache.length}")
    assert lean_cache.length == sum(map(len, CHUNKS)) > 4 * WINDOW


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_logits_match_transformers_while_the_cache_grows(family_models, family, monkeypatch):
    from gptcli.backends import torch_lean

    monkeypatch.setattr(torch_lean, "INITIAL_CACHE", 4)  # force several regrowths
    _assert_same_logits_while_the_cache_grows(*_engines(family_models[family], monkeypatch))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_are_identical_for_32_steps(family_models, family, monkeypatch):
    lean, hf = _engines(family_models[family], monkeypatch)
    prompt = [5, 17, 42, 99, 7, 13, 250, 31, 64, 8, 120, 77]
    ours = greedy_ids(lean, prompt, 32)
    assert ours == greedy_ids(hf, prompt, 32)
    assert len(set(ours)) > 3  # a real continuation, not one token repeated


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batched_step_equals_each_sequence_alone(family_models, family, monkeypatch):
    lean, _ = _engines(family_models[family], monkeypatch)
    prompts = [[3, 4, 5], list(range(10, 21)), list(range(100, 120)), [250]]  # shorter and longer than the window
    logits, caches = batched_step(lean, [(p, lean.new_cache()) for p in prompts])
    together = [[] for _ in prompts]
    for _ in range(12):
        tokens = [int(t) for t in np.argmax(logits, axis=-1)]
        for out, token in zip(together, tokens, strict=True):
            out.append(token)
        logits, caches = batched_step(lean, [([t], c) for t, c in zip(tokens, caches, strict=True)])
    for prompt, row, tokens in zip(prompts, logits, together, strict=True):
        assert greedy_ids(lean, prompt, 12) == tokens
        alone, cache = lean.forward(prompt, lean.new_cache())
        for token in tokens:
            alone, cache = lean.forward([token], cache)
        np.testing.assert_allclose(row, alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_contract_kit_passes(family_models, family, monkeypatch):
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    backend = check_backend_contract(TorchBackend, family_models[family], prompt=list(range(3, 15)))
    assert backend.implementation == "lean"


@pytest.mark.parametrize("variant", IMPLEMENTED_ROPE)
def test_implemented_rope_scaling_matches_transformers(family_models, variant, monkeypatch):
    folder = family_models[f"rope-{variant}"]
    assert read_architecture(folder).rope_type == variant
    lean, hf = _engines(folder, monkeypatch)
    _assert_same_logits_while_the_cache_grows(lean, hf)  # longrope: past its 16-position pretraining length
    assert greedy_ids(lean, [5, 17, 42, 99], 24) == greedy_ids(hf, [5, 17, 42, 99], 24)


def test_dynamic_rope_is_refused_with_its_config_key(family_models, monkeypatch):
    folder = family_models["rope-dynamic"]
    reason = "rope_parameters: rope type 'dynamic' is not supported"
    assert read_architecture(folder).fast_path_refusal("lean") == reason
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "auto")
    backend = TorchBackend.load(folder, CPU32)  # falls back to transformers' engine, and says why
    assert backend.implementation == "hf"
    assert backend.fallback_reason == f"{reason}: running transformers' engine instead of the lean one"
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "lean")
    with pytest.raises(ModelError, match=f"the lean torch engine cannot run rope-dynamic: {reason}"):
        TorchBackend.load(folder, CPU32)


def test_the_exporter_takes_the_new_families_but_refuses_rope_it_does_not_bake(family_models):
    from gptcli import export

    for family in FAMILIES:
        export.check_exportable(read_architecture(family_models[family]))  # tests/test_export_families.py runs them
    longrope = read_architecture(family_models["rope-longrope"])
    with pytest.raises(ModelError, match="rope type 'longrope' is not supported"):
        export.check_exportable(longrope)


def test_each_family_is_described_once(family_models):
    qwen2, qwen3, mistral, gemma, phi3 = (read_architecture(family_models[f]) for f in FAMILIES)
    assert (qwen2.family, qwen2.qkv_bias, qwen2.sliding_window) == ("qwen2", True, WINDOW)
    assert qwen2.layer_types == ("full_attention", "sliding_attention")  # max_window_layers = 1
    assert qwen3.qk_norm and qwen3.qkv_bias and qwen3.layer_types == ()
    assert mistral.layer_types == ("sliding_attention",) * 2 and mistral.sliding_window == WINDOW
    assert (gemma.family, gemma.embedding_scale, gemma.norm_offset, gemma.attention_scale) == (
        "gemma3", 8.0, 1.0, 24**-0.5,
    )  # fmt: skip
    assert gemma.sandwich_norms and gemma.qk_norm and gemma.tied and gemma.activation == "gelu_pytorch_tanh"
    assert (gemma.rope_theta, gemma.rope_local_theta, gemma.rope_type) == (1e6, 1e4, "linear")
    assert gemma.layer_types == ("sliding_attention", "full_attention")
    assert phi3.fused_qkv and phi3.fused_gate_up and phi3.sliding_window is None
    assert all(a.fast_path_refusal("lean") is None for a in (qwen2, qwen3, mistral, gemma, phi3))


def test_older_config_forms_read_the_same(family_models):
    """transformers 4.x configs: rope_local_base_freq, sliding_window_pattern, rope_scaling, no layer_types."""
    cfg = json.loads((family_models["gemma3"] / "config.json").read_text())
    old = {k: v for k, v in cfg.items() if k not in {"rope_parameters", "layer_types"}}
    old |= {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    arch = Architecture.from_config({**old, "sliding_window_pattern": 2})
    new = Architecture.from_config(cfg)
    assert (arch.layer_types, arch.rope_theta, arch.rope_local_theta) == (new.layer_types, 1e6, 1e4)
    assert arch.rope_scaling == {"rope_type": "linear", "factor": 2.0} and arch.rope_key == "rope_scaling"
    qwen = json.loads((family_models["qwen2"] / "config.json").read_text())
    assert Architecture.from_config({**qwen, "use_sliding_window": False}).layer_types == ()
    unsaid = {k: v for k, v in qwen.items() if k not in {"use_sliding_window", "layer_types"}}
    assert Architecture.from_config(unsaid).sliding_window is None  # transformers' default: no window
    assert Architecture.from_config({**unsaid, "use_sliding_window": True}).layer_types == tuple(qwen["layer_types"])


@pytest.mark.parametrize(
    ("family", "changes", "reason"),
    [
        ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
        ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
        ("phi3", {"partial_rotary_factor": 0.75}, "rope_parameters.partial_rotary_factor=0.75 is not supported"),
        ("qwen3", {"hidden_act": "relu"}, "activation relu is not supported"),
        ("mistral", {"mlp_bias": True}, "mlp_bias: MLP biases are not supported"),
    ],
)
def test_settings_the_lean_engine_does_not_implement_are_refused_by_name(family_models, family, changes, reason):
    cfg = json.loads((family_models[family] / "config.json").read_text())
    if "partial_rotary_factor" in changes:
        cfg["rope_parameters"] = {**cfg["rope_parameters"], **changes}
    assert Architecture.from_config({**cfg, **changes}).fast_path_refusal("lean") == reason


def test_an_impossible_window_or_layer_list_is_a_model_error(family_models):
    cfg = json.loads((family_models["mistral"] / "config.json").read_text())
    with pytest.raises(ModelError, match=r"sliding_window = 0 is impossible"):
        Architecture.from_config({**cfg, "sliding_window": 0})
    with pytest.raises(ModelError, match=r"layer_types = .* is impossible \(needs 2 entries"):
        Architecture.from_config({**cfg, "layer_types": ["sliding_attention"]})
