"""The Hugging Face model folder format, read in one place: config.json, safetensors headers, the sidecar.

`Architecture.from_config` turns a config.json into one typed description that every reader uses
(the lean torch engine, the ONNX exporter, `models info`, the roofline, the llama.cpp exporter).
Impossible values (a size that is not a positive integer, a dimension that disagrees with the
tensors in the safetensors files) are a ModelError naming the file and the key, found from the
headers alone: nothing is allocated before the check passes.

The families the fast paths know are in `FAMILIES` (families.py: Llama, GPT-2, Qwen2, Qwen3, Mistral,
Gemma 3, Phi-3); any other model is family "other", which is not an error: it simply runs through
transformers. `Architecture.fast_path_refusal(path)` is the one rule for what each fast path covers.
"""

from gptcli.hf.architecture import (
    FAST_PATH_FAMILIES,
    SIZE_KEYS,
    Architecture,
    layers_held,
    read_architecture,
    validate_model_dir,
)
from gptcli.hf.families import FAMILIES, FULL, LLAMA_LIKE, SLIDING, ImpossibleValue, config_key
from gptcli.hf.files import (
    CONFIG_FILE,
    CONTEXT_KEYS,
    DEFAULT_CONTEXT,
    DTYPE_SIZES,
    TRAINING_STATE_FILE,
    TensorHeader,
    context_length,
    file_tensors,
    has_source,
    header_tensors,
    param_count,
    read_config,
    safetensors_header,
    weight_files,
    write_source,
)
from gptcli.paths import SOURCE_FILE, read_source

__all__ = [
    "CONFIG_FILE", "CONTEXT_KEYS", "DEFAULT_CONTEXT", "DTYPE_SIZES", "FAMILIES", "FAST_PATH_FAMILIES", "FULL",
    "LLAMA_LIKE", "SIZE_KEYS", "SLIDING", "SOURCE_FILE", "TRAINING_STATE_FILE", "Architecture", "ImpossibleValue",
    "TensorHeader", "config_key", "context_length", "file_tensors", "has_source", "header_tensors", "layers_held",
    "param_count", "read_architecture", "read_config", "read_source", "safetensors_header", "validate_model_dir",
    "weight_files", "write_source",
]  # fmt: skip
