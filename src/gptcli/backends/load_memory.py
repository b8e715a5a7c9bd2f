"""The least memory a backend's load takes, known before it starts: the weights as the load holds them.

A backend may offer `memory_floor(folder, options) -> MemoryFloor | None` (a classmethod; optional, like
`fork`): `gptcli.runtime` refuses a model whose floor is more than the memory left, where the load would
otherwise end minutes later in the kernel's kill (exit 137) with no word. It is a floor (packed copies, the
KV cache and the runtime come on top), so a model that fits is never refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptcli.hardware import nvidia_gpu_reason

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp32": 4.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class MemoryFloor:
    bytes: int
    params: int
    held_as: str  # what each weight is while loading: "float32", "int4", ...
    hint: str  # what would need less


def safetensors_floor(folder: Path, held_as: str, hint: str) -> MemoryFloor | None:
    """`folder`'s weights (counted from the safetensors headers, nothing read) held as `held_as`; None
    without safetensors (a pickle, a GGUF: their size is not known here)."""
    from gptcli.hf import param_count

    params = param_count(folder)
    if params is None:
        return None
    return MemoryFloor(int(params * BYTES_PER_PARAM[held_as]), params, held_as, hint)


def may_load_on_gpu(device: str) -> bool:
    """Whether the weights may go to a GPU (whose memory is not this check's): --device cuda, or auto with one."""
    return device == "cuda" or (device == "auto" and nvidia_gpu_reason() is None)
