"""The model families the fast paths know, and how each one's config.json says what it needs.

Every decoder-only family here is "llama-like": pre-norm blocks of rope attention and a gated MLP, with
per-family switches (biases, q/k norms, sliding windows, Gemma's scaled embedding and (1 + w) norms,
Phi-3's fused weights). `decoder_fields` reads those switches once, so the engines never re-read the
config. Rope settings come in the transformers 5 form (`rope_parameters`, nested per layer type for
Gemma 3) or the older one (`rope_theta` + `rope_scaling`, `rope_local_base_freq`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from gptcli.errors import ModelError
from gptcli.hf.rope import rope_type

MAX_SIZE = 2**24  # past every real size (the longest context, Llama 4 Scout's, is 10M): a larger one is corrupt

# The architecture (config "architectures"[0]) each fast-path family covers.
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "GPT2LMHeadModel": "gpt2",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
# Without "architectures", the model_type names the family (under its own name where it differs).
MODEL_TYPES = {"gemma3_text": "gemma3", **{family: family for family in FAMILIES.values()}}
LLAMA_LIKE = frozenset(FAMILIES.values()) - {"gpt2"}
SLIDING, FULL = "sliding_attention", "full_attention"
# The rope types whose inverse frequencies need the pretraining context length.
NEEDS_ORIGINAL_CONTEXT = ("llama3", "yarn", "longrope")


def family_of(cfg: Mapping[str, Any]) -> tuple[str, str]:
    """(family, architecture name); a family the fast paths do not know is "other"."""
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):  # a hand-written config's one name, not a list of them
        archs = [archs]
    model_type = cfg.get("model_type")
    architecture = str(archs[0] if archs else model_type or "?")
    family = FAMILIES.get(architecture) if archs else MODEL_TYPES.get(str(model_type))
    return family or "other", architecture


def decoder_fields(family: str, cfg: Mapping[str, Any], where: str, *, hidden: int, layers: int) -> dict[str, Any]:
    """The Architecture fields of a llama-like family that differ between families."""
    gemma = family == "gemma3"
    window, layer_types = _sliding_layers(family, cfg, where, layers)
    fields: dict[str, Any] = {
        "tied": bool(cfg.get("tie_word_embeddings", gemma)),
        # Qwen2 always has q/k/v biases (its config has no key for them); the others say attention_bias.
        "qkv_bias": family == "qwen2" or bool(cfg.get("attention_bias", False)),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        "activation": str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"),
        "qk_norm": family in {"qwen3", "gemma3"},
        "sliding_window": window,
        "layer_types": layer_types,
        "fused_qkv": family == "phi3",
        "fused_gate_up": family == "phi3",
    }
    quirks = [f"pretraining_tp={cfg['pretraining_tp']}"] if cfg.get("pretraining_tp", 1) not in (1, None) else []
    if gemma:
        scalar = cfg.get("query_pre_attn_scalar", 256)
        if isinstance(scalar, bool) or not isinstance(scalar, int | float) or scalar <= 0:
            impossible(where, "query_pre_attn_scalar", scalar, "must be a positive number")
        fields.update(
            embedding_scale=hidden**0.5, norm_offset=1.0, sandwich_norms=True, attention_scale=float(scalar) ** -0.5
        )
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if cfg.get(key) is not None:
                quirks.append(f"{key}={cfg[key]}")
        if cfg.get("use_bidirectional_attention"):
            quirks.append("use_bidirectional_attention=True")
    fields["quirks"] = tuple(quirks)
    return fields


def _sliding_layers(family: str, cfg: Mapping[str, Any], where: str, layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(the window, each layer's attention type); (None, ()) when every layer attends to everything."""
    window = cfg.get("sliding_window")
    if family in {"qwen2", "qwen3"} and not cfg.get("use_sliding_window", False):
        window = None  # Qwen configs carry a window they do not use (use_sliding_window defaults to false)
    if window is None or family == "llama":
        return None, ()
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        impossible(where, "sliding_window", window, "must be a positive integer")
    types = cfg.get("layer_types")
    if types is None:
        if family == "gemma3":
            pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
        elif family in {"qwen2", "qwen3"}:
            first = int(cfg.get("max_window_layers", layers))
            types = [SLIDING if i >= first else FULL for i in range(layers)]
        else:  # Mistral and Phi-3: every layer slides
            types = [SLIDING] * layers
    if not isinstance(types, list | tuple) or len(types) != layers or not set(types) <= {SLIDING, FULL}:
        impossible(where, "layer_types", types, f"needs {layers} entries of {SLIDING!r} or {FULL!r}")
    return (window, tuple(types)) if SLIDING in types else (None, ())


def rope_settings(cfg: Mapping[str, Any], where: str, *, local: bool) -> dict[str, Any]:
    """rope_theta, rope_scaling (None: plain rope), rope_key and, when `local`, the sliding layers' rope_local_theta.

    A setting the fast paths do not implement lands in "quirks" (partial rotary, scaled sliding layers).
    """
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"  # as transformers: a legacy one wins
    rope = cfg.get(key) or {}
    if not isinstance(rope, Mapping):
        impossible(where, key, rope, "not an object")
    sliding: Mapping[str, Any] | None = None
    if FULL in rope or SLIDING in rope:  # Gemma 3 in transformers 5: one section per layer type
        full, sliding = rope.get(FULL) or {}, rope.get(SLIDING)
        for name, section in ((FULL, full), (SLIDING, sliding or {})):
            if not isinstance(section, Mapping):
                impossible(where, f"{key}.{name}", section, "not an object")
    else:
        full = rope
    quirks = []
    sections = [(key, full)] + ([(f"{key}.{SLIDING}", sliding)] if sliding is not None else [])
    for section_name, section in sections:
        partial = section.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if partial not in (1, 1.0, None):
            quirks.append(f"{section_name}.partial_rotary_factor={partial}")
    settings: dict[str, Any] = {
        "rope_theta": positive_float(cfg, full, "rope_theta", 10000.0, where),
        "rope_scaling": None,
        "rope_key": f"{key}.{FULL}" if sliding is not None else key,
    }
    kind = rope_type(full)
    if kind != "default":
        for factor in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor"):
            value = full.get(factor)  # rope divides by them: 0 would make every logit NaN
            if value is not None and not (isinstance(value, int | float) and not isinstance(value, bool) and value > 0):
                impossible(where, f"{key}.{factor}", value, "must be a positive number")
        scaling = dict(full)
        original = cfg.get("original_max_position_embeddings")
        if original is not None and kind in NEEDS_ORIGINAL_CONTEXT:
            scaling["original_max_position_embeddings"] = original  # Phi-3 keeps it outside, and it wins there
        settings["rope_scaling"] = scaling
    if local:
        section = sliding or {}
        settings["rope_local_theta"] = positive_float(
            {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}, section, "rope_theta", 10000.0, where
        )
        local_type = rope_type(section)
        if local_type != "default":
            quirks.append(f"{key}.{SLIDING}.rope_type={local_type}")
    settings["rope_quirks"] = tuple(quirks)
    return settings


# --------------------------------------------------------------------------- value checks


def config_key(cfg: Mapping[str, Any], keys: Iterable[str]) -> str:
    """The first of `keys` the config gives (the first of them all when it gives none)."""
    return next((k for k in keys if cfg.get(k) is not None), next(iter(keys)))


class ImpossibleValue(ModelError):
    """A config value no model can have. `key`, `value` and `why` let a caller that read the value from elsewhere
    (a GGUF's header, under its own key) say it its own way."""

    def __init__(self, where: str, key: str, value: Any, why: str) -> None:
        super().__init__(f"{where}: {key} = {value!r} is impossible ({why})", hint="fix or replace the config.json")
        self.key, self.value, self.why = key, value, why


def impossible(where: str, key: str, value: Any, why: str) -> None:
    raise ImpossibleValue(where, key, value, why)


def config_size(cfg: Mapping[str, Any], keys: Iterable[str], where: str, *, known: bool, required: bool) -> int:
    """The first of `keys` the config gives, checked to be a positive integer; 0 when absent and optional.

    A family the fast paths do not know (`known` false) may use a key for something else (a per-layer
    list, say): only numbers are checked there, and nothing is required.
    """
    keys = tuple(keys)
    key = config_key(cfg, keys)
    value = cfg.get(key)
    if value is None or (not known and (isinstance(value, bool) or not isinstance(value, int | float))):
        if required and known:
            raise ModelError(f"{where}: {key} is missing", hint="fix or replace the config.json")
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
        impossible(where, key, value, f"must be a positive integer, at most {MAX_SIZE:,}")
    return value


def positive_float(cfg: Mapping[str, Any], rope: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = rope.get(key, cfg.get(key, default))
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        impossible(where, key, value, "must be a positive number")
    return float(value)
