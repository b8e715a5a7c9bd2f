"""The export's sidecar (gptcli-onnx.json): what was exported, from what, how, and the files' sizes.

Reading an export checks the sidecar and the graph files against each other, so a half-copied or
truncated export is a ModelError (exit 5), not a crash inside onnxruntime.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcli.errors import ModelError
from gptcli.hf import Architecture, param_count
from gptcli.models import ONNX_EXPORT_SIDECAR

MODEL_FILE = "model.onnx"
SIDECAR_FILE = ONNX_EXPORT_SIDECAR


@dataclass(frozen=True)
class Export:
    """A finished export: the folder, its graph file and the sidecar record."""

    folder: Path
    meta: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE


def read_export(folder: Path) -> Export:
    """Read and check an export folder's sidecar and graph file; anything wrong is a ModelError (exit 5)."""
    sidecar = folder / SIDECAR_FILE
    hint = "delete the folder and export again (`gptcli export`)"
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        sizes = {MODEL_FILE: int(meta["files"][MODEL_FILE])}
        if (data_size := meta["files"].get(MODEL_FILE + ".data")) is not None:
            sizes[MODEL_FILE + ".data"] = int(data_size)
    except FileNotFoundError:
        raise ModelError(f"{folder} is not a gptcli ONNX export (no {SIDECAR_FILE})", hint=hint) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"corrupt export sidecar {sidecar}: {exc}", hint=hint) from None
    for name, size in sizes.items():
        if (damage := _damage(folder / name, size)) is not None:
            raise ModelError(f"corrupt or incomplete ONNX export: {folder / name} ({damage})", hint=hint)
    return Export(folder, meta)


def _damage(file: Path, size: int) -> str | None:
    """What is wrong with an export's file that should hold `size` bytes ("missing", "N bytes, ..."), or None."""
    if not file.is_file():
        return "missing"
    found = file.stat().st_size
    return None if found == size else f"{found:,} bytes, its sidecar says {size:,}"


def io_record(arch: Architecture, kv_dtype: str) -> dict[str, Any]:
    """The graph's I/O contract, as the sidecar states it."""
    return {
        "inputs": ["input_ids", "attention_mask", "position_ids", "logits_to_keep"]
        + [f"past_key_values.{i}.{k}" for i in range(arch.layers) for k in ("key", "value")],
        "outputs": ["logits"] + [f"present.{i}.{k}" for i in range(arch.layers) for k in ("key", "value")],
        "kv_layout": "batch, kv_heads, sequence, head_dim",
        "kv_dtype": kv_dtype,
        "logits": "float32 [batch, logits_to_keep, vocab]: the last logits_to_keep positions (int64 [1]; 1 to decode)",
    }


def model_record(arch: Architecture, folder: Path) -> dict[str, Any]:
    """The exported model's shape, as the ONNX backend reads it back."""
    return {
        "architecture": arch.architecture,
        "family": arch.family,
        "num_layers": arch.layers,
        "hidden_size": arch.hidden,
        "num_heads": arch.heads,
        "num_kv_heads": arch.kv_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab,
        "context_length": arch.context,
        "params": param_count(folder) or 0,
    }


def write_sidecar(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the record, stamped with its time and the sizes of the files already in `out`; return it."""
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    record = {**meta, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    (out / SIDECAR_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
