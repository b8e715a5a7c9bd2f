"""The files of a model folder: config.json, the safetensors headers and weight shards, the source sidecar."""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcli.errors import ModelError
from gptcli.paths import SOURCE_FILE
from gptcli.textio import MiB, read_json_file

CONFIG_FILE = "config.json"
# A training checkpoint is a model folder with its optimizer state beside the weights (not part of the model).
TRAINING_STATE_FILE = "training_state.pt"
DEFAULT_CONTEXT = 2048
# Bytes per element of the safetensors dtypes, to check that a header's shapes match its byte ranges.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
MAX_CONFIG_BYTES = 16 * MiB  # config.json, the shard index: real ones are kilobytes
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")


# --------------------------------------------------------------------------- config.json


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict; a missing or unreadable one is a ModelError."""
    path = folder / CONFIG_FILE
    try:
        config = read_json_file(path, MAX_CONFIG_BYTES)
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
        ranges = sorted(_checked_entry(name, entry) for name, entry in header.items() if name != "__metadata__")
        end = 0
        for begin, stop in ranges:  # what the safetensors library requires: the tensors tile the data, in order
            if begin != end:
                raise ValueError(f"tensor data {'overlaps' if begin < end else 'has a gap'} at byte {min(begin, end)}")
            end = stop
        if 8 + header_len + end > size:
            raise ValueError(f"truncated: {size} bytes, needs {8 + header_len + end}")
    except RecursionError:
        raise ModelError(f"corrupt safetensors file {path}: its header is nested too deeply") from None
    except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError, struct.error) as exc:
        raise ModelError(f"corrupt safetensors file {path}: {exc}", hint="re-download or re-create the model") from None
    return header


def _checked_entry(name: str, entry: Mapping[str, Any]) -> tuple[int, int]:
    """A header entry's byte range, after checking its dtype and that its shape and range agree."""
    shape, (begin, end) = entry["shape"], entry["data_offsets"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"tensor {name} has an impossible shape {shape}")
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise ValueError(f"tensor {name} has impossible data offsets {[begin, end]}")
    width = DTYPE_SIZES.get(entry["dtype"])
    if width is None:
        raise ValueError(f"tensor {name} has dtype {str(entry['dtype'])[:20]!r}, not one gptcli can read")
    if end - begin != math.prod(shape) * width:
        raise ValueError(f"tensor {name}: shape {shape} needs {math.prod(shape) * width} bytes, it has {end - begin}")
    return begin, end


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder (the shards its index names, or every *.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(read_json_file(index, MAX_CONFIG_BYTES)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"corrupt index {index}: {exc}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelError(f"{folder}: missing weight shard {missing[0]}", hint="re-download the model")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    odd = next((f for f in files if not f.is_file()), None)
    if odd is not None:  # a FIFO would block every read; a folder or a dangling link is not weights either
        raise ModelError(f"{odd} is not a regular file", hint="replace it with the model's weights")
    return files


def file_tensors(files: Iterable[Path]) -> Iterator[TensorHeader]:
    """Every tensor of these safetensors files, from their headers only."""
    for file in files:
        for name, entry in safetensors_header(file).items():
            if name != "__metadata__":
                yield TensorHeader(name, entry["dtype"], tuple(entry["shape"]), file)


def header_tensors(folder: Path) -> Iterator[TensorHeader]:
    """Every tensor of a folder's safetensors, loading none."""
    return file_tensors(weight_files(folder))


def param_count(folder: Path) -> int | None:
    """How many weights a folder's safetensors hold, from their headers (None without safetensors: a pickle)."""
    files = weight_files(folder)
    return sum(tensor.count for tensor in file_tensors(files)) if files else None


# --------------------------------------------------------------------------- the source sidecar


def write_source(folder: Path, source: str) -> None:
    record = {"source": source, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def has_source(folder: Path) -> bool:
    """Whether a cache folder is complete: the sidecar is written last, just before publishing."""
    return (folder / SOURCE_FILE).is_file()
