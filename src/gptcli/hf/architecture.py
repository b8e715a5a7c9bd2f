"""`Architecture`: what a config.json says about a model's shape, checked, in one typed description."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptcli.errors import ModelError
from gptcli.hf.families import (
    FAMILIES,
    LLAMA_LIKE,
    config_key,
    config_size,
    decoder_fields,
    family_of,
    impossible,
    positive_float,
    rope_settings,
)
from gptcli.hf.files import (
    CONFIG_FILE,
    CONTEXT_KEYS,
    DEFAULT_CONTEXT,
    TensorHeader,
    file_tensors,
    read_config,
    weight_files,
)
from gptcli.hf.rope import rope_type as scaling_rope_type

# The same size under the names different families give it (transformers' attribute_map), first wins.
SIZE_KEYS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab": ("vocab_size",),
}
# What each fast path runs exactly: "lean" (the torch lean engine) and "onnx" (the fused-graph exporter).
# Anything else is refused by `fast_path_refusal`: the torch backend then runs transformers' engine.
FAST_PATH_FAMILIES = {"lean": frozenset(FAMILIES.values()), "onnx": frozenset(FAMILIES.values())}
FAST_PATH_ROPE_TYPES = {
    "lean": frozenset({"default", "linear", "llama3", "yarn", "longrope"}),
    "onnx": frozenset({"default", "linear", "llama3", "yarn"}),  # tables baked into the graph (export/rope.py)
}
# The head sizes ONNX Runtime's GroupQueryAttention (one per layer of the fused graph) runs: whole 8s, and
# whole 16s where it applies the rotary embedding itself (every family but GPT-2).
ONNX_HEAD_DIM_MULTIPLE = {"plain": 8, "rotary": 16}
GPT2_ACTIVATIONS = frozenset({"gelu_new", "gelu_pytorch_tanh"})
DECODER_ACTIVATIONS = {
    "lean": frozenset({"silu", "gelu_pytorch_tanh", "gelu_new"}),
    "onnx": frozenset({"silu", "gelu_pytorch_tanh", "gelu_new"}),
}
# The settings each implemented rope type cannot do without.
ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("long_factor", "short_factor"),
}


@dataclass(frozen=True)
class Architecture:
    """What config.json says about a model's shape. For family "other", a size it does not give is 0."""

    family: str  # "llama", "gpt2", "qwen2", "qwen3", "mistral", "gemma3", "phi3" or "other"
    architecture: str  # e.g. "LlamaForCausalLM" (the model_type when "architectures" is missing)
    model_type: str | None
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context: int
    rope_theta: float = 10000.0  # of the full-attention layers
    rope_scaling: Mapping[str, Any] | None = field(default=None, hash=False)  # None: plain rope
    rope_key: str = "rope_parameters"  # where config.json keeps the rope settings, for messages
    rope_local_theta: float | None = None  # Gemma 3's sliding layers have their own base (rope_local_base_freq)
    norm: str = "rmsnorm"  # "rmsnorm", "layernorm" or "unknown"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # 1.0: Gemma's RMSNorm scales by (1 + w)
    tied: bool = False  # the lm_head is the token embedding
    qkv_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope (Qwen3, Gemma 3)
    sliding_window: int | None = None  # a sliding layer attends to the last `sliding_window` positions
    layer_types: tuple[str, ...] = ()  # "sliding_attention" / "full_attention" per layer; empty: all full
    embedding_scale: float = 1.0  # Gemma multiplies the embedding by sqrt(hidden)
    sandwich_norms: bool = False  # Gemma's extra norms after attention and after the MLP
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar ** -0.5)
    fused_qkv: bool = False  # Phi-3 stores q/k/v as one qkv_proj ...
    fused_gate_up: bool = False  # ... and gate/up as one gate_up_proj
    # Config switches the fast paths do not implement, as "key=value" (GPT-2's per-layer scaling, ...).
    quirks: tuple[str, ...] = ()
    source: str = CONFIG_FILE  # the file it was read from, for error messages

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, source: Path | str = CONFIG_FILE) -> Architecture:
        """Read and check a config.json dict; an impossible value is a ModelError naming `source` and the key."""
        where = str(source)
        family, architecture = family_of(cfg)
        known = family != "other"
        optional = {"kv_heads", "head_dim"} | ({"intermediate"} if family == "gpt2" else set())
        sizes = {
            name: config_size(cfg, keys, where, known=known, required=name not in optional)
            for name, keys in SIZE_KEYS.items()
        }
        heads, hidden = sizes["heads"], sizes["hidden"]
        kv_heads = sizes["kv_heads"] or heads
        if heads and not sizes["head_dim"] and hidden % heads:
            impossible(where, config_key(cfg, SIZE_KEYS["hidden"]), hidden, f"not a multiple of {heads} heads")
        if heads and heads % kv_heads:
            impossible(where, "num_key_value_heads", kv_heads, f"does not divide {heads} attention heads")
        rope = rope_settings(cfg, where, local=family == "gemma3")
        rope_quirks = rope.pop("rope_quirks")
        common: dict[str, Any] = {
            "family": family,
            "architecture": architecture,
            "model_type": cfg.get("model_type"),
            "layers": sizes["layers"],
            "hidden": hidden,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": sizes["head_dim"] or (hidden // heads if heads else 0),
            "intermediate": sizes["intermediate"],
            "vocab": sizes["vocab"],
            "context": config_size(cfg, CONTEXT_KEYS, where, known=known, required=False) or DEFAULT_CONTEXT,
            **rope,
            "source": where,
        }
        if family == "gpt2":
            return cls(
                **{**common, "intermediate": sizes["intermediate"] or 4 * hidden},
                norm="layernorm",
                norm_eps=positive_float(cfg, {}, "layer_norm_epsilon", 1e-5, where),
                tied=bool(cfg.get("tie_word_embeddings", True)),
                qkv_bias=True,
                mlp_bias=True,
                activation=str(cfg.get("activation_function", "gelu_new")),
                quirks=_gpt2_quirks(cfg) + rope_quirks,
            )
        eps_key = next((k for k in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon") if k in cfg), "")
        norm_eps = positive_float(cfg, {}, eps_key, 1e-6, where) if eps_key else 1e-6
        if family in LLAMA_LIKE:
            fields = decoder_fields(family, cfg, where, hidden=hidden, layers=sizes["layers"])
            fields["quirks"] += rope_quirks
            return cls(**common, norm="rmsnorm", norm_eps=norm_eps, **fields)
        return cls(
            **common,
            norm="rmsnorm" if eps_key == "rms_norm_eps" else ("layernorm" if eps_key else "unknown"),
            norm_eps=norm_eps,
            tied=bool(cfg.get("tie_word_embeddings", True)),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            activation=str(cfg.get("hidden_act") or cfg.get("activation_function") or "?"),
        )

    @property
    def rope_type(self) -> str:
        return scaling_rope_type(self.rope_scaling)

    def fast_path_refusal(self, path: str) -> str | None:
        """Why a fast path ("lean": the torch lean engine, "onnx": the exporter) cannot run this model exactly.

        None when it can. The reason names the config key at fault, so a user sees why a slower engine runs.
        """
        if self.family not in FAST_PATH_FAMILIES[path]:
            return f"{self.architecture} is not a model family the {path} path knows"
        if self.rope_type not in FAST_PATH_ROPE_TYPES[path]:
            return f"{self.rope_key}: rope type '{self.rope_type}' is not supported"
        missing = [k for k in ROPE_REQUIRED_KEYS.get(self.rope_type, ()) if self.rope_scaling.get(k) is None]
        if missing:
            return f"{self.rope_key}: rope type '{self.rope_type}' needs '{missing[0]}'"
        expected = GPT2_ACTIVATIONS if self.family == "gpt2" else DECODER_ACTIVATIONS[path]
        if self.activation not in expected:
            return f"activation {self.activation} is not supported"
        if self.family != "gpt2" and self.mlp_bias:
            return "mlp_bias: MLP biases are not supported"
        if self.quirks:
            return f"{', '.join(self.quirks)} is not supported"
        multiple = ONNX_HEAD_DIM_MULTIPLE["plain" if self.family == "gpt2" else "rotary"]
        if path == "onnx" and self.head_dim % multiple:
            return (
                f"its attention heads have {self.head_dim} dimensions (hidden size / heads, or head_dim);"
                f" ONNX Runtime's attention needs a multiple of {multiple}"
            )
        return None

    def check_tensors(self, tensors: Mapping[str, TensorHeader]) -> None:
        """Check the sizes against the safetensors headers (the known families; others are not checked)."""
        if self.family in LLAMA_LIKE:
            expected = _decoder_shapes(self)
            layer_prefix, layers_key = "model.layers.", "num_hidden_layers"
        elif self.family == "gpt2":
            # Original OpenAI checkpoints name weights without the "transformer." prefix.
            tensors = {_gpt2_name(k): v for k, v in tensors.items()}
            expected = {
                "transformer.wte.weight": ((self.vocab, self.hidden), ("vocab_size", "n_embd")),
                "transformer.h.0.attn.c_attn.weight": ((self.hidden, 3 * self.hidden), ("n_embd", "n_embd")),
                "transformer.h.0.mlp.c_fc.weight": ((self.hidden, self.intermediate), ("n_embd", "n_inner")),
                "transformer.wpe.weight": ((self.context, self.hidden), ("n_positions", "n_embd")),
            }
            layer_prefix, layers_key = "transformer.h.", "n_layer"
        else:
            self._check_layer_count(tensors)
            return
        for name, (shape, keys) in expected.items():
            tensor = tensors.get(name)
            if tensor is not None and tensor.shape != shape:
                blame = next(
                    (k for k, want, got in zip(keys, shape, tensor.shape, strict=False) if want != got), keys[0]
                )
                raise ModelError(
                    f"{self.source}: {blame} disagrees with {tensor.file}: tensor {name} has shape "
                    f"{list(tensor.shape)}, the config implies {list(shape)}",
                    hint="the config.json does not belong to these weights",
                )
        present = {int(k[len(layer_prefix) :].split(".", 1)[0]) for k in tensors if k.startswith(layer_prefix)}
        if present and present != set(range(self.layers)):
            raise ModelError(
                f"{self.source}: {layers_key} = {self.layers} disagrees with the weights, which hold "
                f"{len(present)} layers", hint="the config.json does not belong to these weights",
            )  # fmt: skip

    def _check_layer_count(self, tensors: Mapping[str, TensorHeader]) -> None:
        """A family without known shapes: its layer count must not outgrow the numbered stacks its weights hold
        (`model.layers.N.`, `transformer.h.N.`, ...). transformers builds every layer the config names before
        it loads a weight: 100,000 of them filled the memory."""
        held = layers_held(tensors)
        if held and self.layers > held:
            raise ModelError(
                f"{self.source}: {self.layers} layers disagree with the weights, which hold {held}",
                hint="the config.json does not belong to these weights",
            )


NUMBERED = re.compile(r"^(.*?\.)(\d+)\.")  # a tensor in a numbered stack: its prefix and its layer


def layers_held(names: Iterable[str]) -> int:
    """How many layers the tensors named hold: the longest numbered stack (`model.layers.N.`, GGUF's `blk.N.`);
    0 when none is numbered."""
    stacks: dict[str, set[int]] = {}
    for name in names:
        match = NUMBERED.match(name)
        if match:
            stacks.setdefault(match.group(1), set()).add(int(match.group(2)))
    return max((len(indices) for indices in stacks.values()), default=0)


def _decoder_shapes(arch: Architecture) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """The shapes a llama-like family's first layer must have, with the config keys that set them."""
    q_rows, kv_rows = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    layer = "model.layers.0."
    shapes = {"model.embed_tokens.weight": ((arch.vocab, arch.hidden), ("vocab_size", "hidden_size"))}
    if arch.fused_qkv:
        shapes[layer + "self_attn.qkv_proj.weight"] = (
            (q_rows + 2 * kv_rows, arch.hidden), ("num_key_value_heads", "hidden_size"),
        )  # fmt: skip
    else:
        shapes[layer + "self_attn.q_proj.weight"] = ((q_rows, arch.hidden), ("num_attention_heads", "hidden_size"))
        shapes[layer + "self_attn.k_proj.weight"] = ((kv_rows, arch.hidden), ("num_key_value_heads", "hidden_size"))
    if arch.fused_gate_up:
        shapes[layer + "mlp.gate_up_proj.weight"] = (
            (2 * arch.intermediate, arch.hidden), ("intermediate_size", "hidden_size"),
        )  # fmt: skip
    else:
        gate = ((arch.intermediate, arch.hidden), ("intermediate_size", "hidden_size"))
        shapes[layer + "mlp.gate_proj.weight"] = gate
    if arch.qk_norm:
        shapes[layer + "self_attn.q_norm.weight"] = ((arch.head_dim,), ("head_dim",))
    return shapes


def _gpt2_name(name: str) -> str:
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


def _gpt2_quirks(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    flags = {
        "scale_attn_weights": (cfg.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (cfg.get("scale_attn_by_inverse_layer_idx", False), False),
        "reorder_and_upcast_attn": (cfg.get("reorder_and_upcast_attn", False), False),
    }
    return tuple(f"{key}={value}" for key, (value, usual) in flags.items() if bool(value) != usual)


def read_architecture(folder: Path, *, files: Iterable[Path] | None = None) -> Architecture:
    """config.json as an Architecture, checked against the safetensors headers (no tensor is read)."""
    architecture = Architecture.from_config(read_config(folder), source=folder / CONFIG_FILE)
    checked_files = weight_files(folder) if files is None else files
    architecture.check_tensors({t.name: t for t in file_tensors(checked_files)})
    return architecture


PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


def validate_model_dir(folder: Path, *, allow_pickle: bool) -> None:
    """Check that a folder is a loadable HF model without loading it: config, headers, and their agreement."""
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} is not a model folder (no config.json)",
            hint="pass a Hugging Face model folder, a .gguf file, or an alias from `gptcli models list`",
        )
    files = weight_files(folder)
    if not files:
        pickled = [n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickled and not allow_pickle:
            raise ModelError(
                f"{folder} has only pickled weights ({pickled[0]}), which can run code when loaded",
                hint="convert them to safetensors, or pass --allow-pickle if you trust the source",
            )
        if not pickled:
            raise ModelError(f"{folder} has no weights (*.safetensors)", hint="is the download complete?")
    read_architecture(folder, files=files)
