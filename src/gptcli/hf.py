"""The Hugging Face model folder format, read in one place: config.json, safetensors headers, the sidecar.

`Architecture.from_config` turns a config.json into one typed description that every reader uses
(the lean torch engine, the ONNX exporter, `models info`, the roofline, the llama.cpp exporter).
Impossible values (a size that is not a positive integer, a dimension that disagrees with the
tensors in the safetensors files) are a ModelError naming the file and the key, found from the
headers alone: nothing is allocated before the check passes.

Families the fast paths know are "llama" and "gpt2"; any other model is family "other", which is
not an error: it simply runs through transformers.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptcli.errors import ModelError

CONFIG_FILE = "config.json"
SOURCE_FILE = "gptcli-source.json"  # where a cached model came from (catalogue entry, .gguf path, hub id)
DEFAULT_CONTEXT = 2048
# Bytes per element of the safetensors dtypes, to check that a header's shapes match its byte ranges.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
# The architecture (config "architectures"[0]) each fast-path family covers; without "architectures",
# the model_type names the family.
FAMILIES = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}
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
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
MAX_SIZE = 2**24  # past every real size (the longest context, Llama 4 Scout's, is 10M): a larger one is corrupt


# --------------------------------------------------------------------------- config.json


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict; a missing or unreadable one is a ModelError."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{folder} is not a model folder (no {CONFIG_FILE})") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"corrupt {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"corrupt {path}: not a JSON object")
    return config


def context_length(cfg: Mapping[str, Any]) -> int:
    """The longest sequence the model was trained for (2048 when the config does not say)."""
    for key in CONTEXT_KEYS:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return DEFAULT_CONTEXT


@dataclass(frozen=True)
class Architecture:
    """What config.json says about a model's shape. For family "other", a size it does not give is 0."""

    family: str  # "llama", "gpt2" or "other"
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
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = field(default=None, hash=False)  # None: plain rope
    norm: str = "rmsnorm"  # "rmsnorm", "layernorm" or "unknown"
    norm_eps: float = 1e-6
    tied: bool = False  # the lm_head is the token embedding
    qkv_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"
    # Config switches the fast paths do not implement, as "key=value" (GPT-2's per-layer scaling, ...).
    quirks: tuple[str, ...] = ()
    source: str = CONFIG_FILE  # the file it was read from, for error messages

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, source: Path | str = CONFIG_FILE) -> Architecture:
        """Read and check a config.json dict; an impossible value is a ModelError naming `source` and the key."""
        where = str(source)
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        architecture = str(archs[0] if archs else model_type or "?")
        known = FAMILIES.get(architecture) if archs else model_type
        family = known if known in FAMILIES.values() else "other"
        optional = {"kv_heads", "head_dim"} | ({"intermediate"} if family == "gpt2" else set())
        sizes = {
            name: _size(cfg, keys, where, known=family != "other", required=name not in optional)
            for name, keys in SIZE_KEYS.items()
        }
        heads, hidden = sizes["heads"], sizes["hidden"]
        kv_heads = sizes["kv_heads"] or heads
        if heads and not sizes["head_dim"] and hidden % heads:
            _impossible(where, _key(cfg, SIZE_KEYS["hidden"]), hidden, f"not a multiple of {heads} heads")
        if heads and heads % kv_heads:
            _impossible(where, "num_key_value_heads", kv_heads, f"does not divide {heads} attention heads")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, Mapping):
            _impossible(where, "rope_parameters", rope, "not an object")
        common: dict[str, Any] = {
            "family": family,
            "architecture": architecture,
            "model_type": model_type,
            "layers": sizes["layers"],
            "hidden": hidden,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": sizes["head_dim"] or (hidden // heads if heads else 0),
            "intermediate": sizes["intermediate"],
            "vocab": sizes["vocab"],
            "context": _size(cfg, CONTEXT_KEYS, where, known=family != "other", required=False) or DEFAULT_CONTEXT,
            "rope_theta": _positive_float(cfg, rope, "rope_theta", 10000.0, where),
            "rope_scaling": dict(rope) if rope.get("rope_type", rope.get("type", "default")) != "default" else None,
            "source": where,
        }
        if family == "gpt2":
            return cls(
                **{**common, "intermediate": sizes["intermediate"] or 4 * hidden},
                norm="layernorm",
                norm_eps=_positive_float(cfg, {}, "layer_norm_epsilon", 1e-5, where),
                tied=bool(cfg.get("tie_word_embeddings", True)),
                qkv_bias=True,
                mlp_bias=True,
                activation=str(cfg.get("activation_function", "gelu_new")),
                quirks=_gpt2_quirks(cfg),
            )
        eps_key = next((k for k in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon") if k in cfg), "")
        rms = family == "llama" or eps_key == "rms_norm_eps"
        norm = "rmsnorm" if rms else ("layernorm" if eps_key else "unknown")
        return cls(
            **common,
            norm=norm,
            norm_eps=_positive_float(cfg, {}, eps_key, 1e-6, where) if eps_key else 1e-6,
            tied=bool(cfg.get("tie_word_embeddings", family != "llama")),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            activation=str(
                cfg.get("hidden_act") or cfg.get("activation_function") or ("silu" if family == "llama" else "?")
            ),
            quirks=_llama_quirks(cfg) if family == "llama" else (),
        )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    def fast_path_refusal(self) -> str | None:
        """Why the fast paths (the lean torch engine, the ONNX exporter) cannot run this model exactly, or None."""
        if self.family not in {"llama", "gpt2"}:
            return f"{self.architecture} is not a Llama or GPT-2 model"
        if self.rope_scaling is not None:
            return f"rope type '{self.rope_type}' is not supported"
        expected = {"llama": {"silu"}, "gpt2": {"gelu_new", "gelu_pytorch_tanh"}}[self.family]
        if self.activation not in expected:
            return f"activation {self.activation} is not supported"
        if self.family == "llama" and self.mlp_bias:
            return "MLP biases are not supported"
        if self.quirks:
            return f"{', '.join(self.quirks)} is not supported"
        return None

    def check_tensors(self, tensors: Mapping[str, TensorHeader]) -> None:
        """Check the sizes against the safetensors headers (llama and gpt2; other families are not checked)."""
        if self.family == "llama":
            expected = {
                "model.embed_tokens.weight": ((self.vocab, self.hidden), ("vocab_size", "hidden_size")),
                "model.layers.0.self_attn.q_proj.weight": (
                    (self.heads * self.head_dim, self.hidden), ("num_attention_heads", "hidden_size"),
                ),
                "model.layers.0.self_attn.k_proj.weight": (
                    (self.kv_heads * self.head_dim, self.hidden), ("num_key_value_heads", "hidden_size"),
                ),
                "model.layers.0.mlp.gate_proj.weight": (
                    (self.intermediate, self.hidden), ("intermediate_size", "hidden_size"),
                ),
            }  # fmt: skip
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


def _gpt2_name(name: str) -> str:
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


def _llama_quirks(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    tp = cfg.get("pretraining_tp", 1)
    return () if tp in (1, None) else (f"pretraining_tp={tp}",)


def _gpt2_quirks(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    flags = {
        "scale_attn_weights": (cfg.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (cfg.get("scale_attn_by_inverse_layer_idx", False), False),
        "reorder_and_upcast_attn": (cfg.get("reorder_and_upcast_attn", False), False),
    }
    return tuple(f"{key}={value}" for key, (value, usual) in flags.items() if bool(value) != usual)


def _key(cfg: Mapping[str, Any], keys: Iterable[str]) -> str:
    return next((k for k in keys if cfg.get(k) is not None), next(iter(keys)))


def _impossible(where: str, key: str, value: Any, why: str) -> None:
    raise ModelError(f"{where}: {key} = {value!r} is impossible ({why})", hint="fix or replace the config.json")


def _size(cfg: Mapping[str, Any], keys: Iterable[str], where: str, *, known: bool, required: bool) -> int:
    """The first of `keys` the config gives, checked to be a positive integer; 0 when absent and optional.

    A family the fast paths do not know (`known` false) may use a key for something else (a per-layer
    list, say): only numbers are checked there, and nothing is required.
    """
    keys = tuple(keys)
    key = _key(cfg, keys)
    value = cfg.get(key)
    if value is None or (not known and (isinstance(value, bool) or not isinstance(value, int | float))):
        if required and known:
            raise ModelError(f"{where}: {key} is missing", hint="fix or replace the config.json")
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
        _impossible(where, key, value, f"must be a positive integer, at most {MAX_SIZE:,}")
    return value


def _positive_float(cfg: Mapping[str, Any], rope: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = rope.get(key, cfg.get(key, default))
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        _impossible(where, key, value, "must be a positive number")
    return float(value)


# --------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header describes it (nothing of its data is read)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def safetensors_header(path: Path) -> dict[str, Any]:
    """Read and check a safetensors header; a truncated or corrupt file is a ModelError."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than its header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, 100_000_000):
                raise ValueError("header length past the end of the file")
            header = json.loads(handle.read(header_len))
        end = 0
        for name, entry in header.items():
            if name != "__metadata__":
                end = max(end, _checked_entry(name, entry))
        if 8 + header_len + end > size:
            raise ValueError(f"truncated: {size} bytes, needs {8 + header_len + end}")
    except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError, struct.error) as exc:
        raise ModelError(f"corrupt safetensors file {path}: {exc}", hint="re-download or re-create the model") from None
    return header


def _checked_entry(name: str, entry: Mapping[str, Any]) -> int:
    """A header entry's end offset, after checking that its shape and byte range agree."""
    shape, (begin, end) = entry["shape"], entry["data_offsets"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"tensor {name} has an impossible shape {shape}")
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise ValueError(f"tensor {name} has impossible data offsets {[begin, end]}")
    width = DTYPE_SIZES.get(entry["dtype"])
    if width is not None and end - begin != math.prod(shape) * width:
        raise ValueError(f"tensor {name}: shape {shape} needs {math.prod(shape) * width} bytes, it has {end - begin}")
    return end


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder (the shards its index names, or every *.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"corrupt index {index}: {exc}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelError(f"{folder}: missing weight shard {missing[0]}", hint="re-download the model")
        return [folder / s for s in shards]
    return sorted(p for p in folder.glob("*.safetensors"))


def file_tensors(files: Iterable[Path]) -> Iterator[TensorHeader]:
    """Every tensor of these safetensors files, from their headers only."""
    for file in files:
        for name, entry in safetensors_header(file).items():
            if name != "__metadata__":
                yield TensorHeader(name, entry["dtype"], tuple(entry["shape"]), file)


def header_tensors(folder: Path) -> Iterator[TensorHeader]:
    """Every tensor of a folder's safetensors, loading none."""
    return file_tensors(weight_files(folder))


def read_architecture(folder: Path, *, files: Iterable[Path] | None = None) -> Architecture:
    """config.json as an Architecture, checked against the safetensors headers (no tensor is read)."""
    architecture = Architecture.from_config(read_config(folder), source=folder / CONFIG_FILE)
    checked_files = weight_files(folder) if files is None else files
    architecture.check_tensors({t.name: t for t in file_tensors(checked_files)})
    return architecture


# --------------------------------------------------------------------------- the source sidecar


def read_source(folder: Path) -> str | None:
    """Where a cached model folder came from (gptcli-source.json), or None when it has no readable record."""
    try:
        source = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return str(source) if source is not None else None


def write_source(folder: Path, source: str) -> None:
    record = {"source": source, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def has_source(folder: Path) -> bool:
    """Whether a cache folder is complete: the sidecar is written last, just before publishing."""
    return (folder / SOURCE_FILE).is_file()
