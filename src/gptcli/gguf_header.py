"""A quick look at a GGUF file before its conversion: is it a GGUF at all, and is it all there?

A download cut short, or a copy that ran out of disk, made transformers' reader fail deep in numpy
("cannot reshape array of size 399424 into shape (576,960)"). The header says where the last tensor's
data ends; comparing that with the file's size takes milliseconds, where the conversion takes tens of seconds.
The same read keeps the header's scalar values and tensor names, for the size checks before a conversion.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gptcli.errors import ModelError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
# Fixed-size value types (GGUF's type id -> struct code); STRING and ARRAY are read piece by piece.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_REDOWNLOAD = "the file is incomplete (an interrupted download or copy?): download or copy it again"
DAMAGED = "the file is damaged, or not a model gptcli can run: download it again, or use another file"
# Arrays of arrays nested deeper than this are refused: real GGUFs nest one or two, and each level is a Python
# call here and in gguf's own reader (200,000 levels were a RecursionError, an "internal error").
MAX_NESTING = 8


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF's header says, as far as the checks before its conversion need it."""

    metadata: dict[str, object]  # the scalar values by key, strings decoded (arrays are left out)
    tensors: tuple[str, ...]  # the tensors' names


class _CutShort(Exception):
    """The header asked for bytes past the end of the file."""


class _TooDeep(Exception):
    """The header nests arrays past MAX_NESTING."""


class _Header:
    """Reads GGUF's little- or big-endian header fields from a buffered file, in order."""

    def __init__(self, file: BinaryIO, order: str, file_size: int) -> None:
        self.file = file
        self.order = order
        self.file_size = file_size

    def read(self, size: int) -> bytes:
        if self.file.tell() + size > self.file_size:  # checked first: a garbled length must not be allocated
            raise _CutShort
        return self.file.read(size)

    def unpack(self, code: str) -> int | float | bool:
        return struct.unpack(self.order + code, self.read(struct.calcsize(code)))[0]

    def count(self) -> int:
        return int(self.unpack("Q"))

    def string(self) -> bytes:
        return self.read(self.count())

    def value(self, kind: int, depth: int = 0) -> object:
        """One metadata value of type `kind` (an array's items are skipped: only scalars are kept); `depth` is how
        many arrays hold it."""
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            if depth >= MAX_NESTING:
                raise _TooDeep
            item_kind, items = int(self.unpack("I")), self.count()
            if item_kind in _SCALARS:
                self.read(items * struct.calcsize(_SCALARS[item_kind]))
            else:
                for _ in range(items):
                    self.value(item_kind, depth + 1)
            return None
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata type {kind}")
        return self.unpack(_SCALARS[kind])


def _tensor_bytes(kind: int, dims: list[int]) -> int | None:
    """How many bytes a tensor of GGML type `kind` takes, or None for a type this gguf does not know."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ImportError, ValueError, KeyError):
        return None
    elements = 1
    for dim in dims:
        elements *= dim
    return elements // block * size


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _read(header: _Header) -> tuple[GGUFHeader, int | None]:
    """The header's values and tensor names, and the byte where the last tensor's data ends (None where it
    cannot tell)."""
    tensors, entries = header.count(), header.count()
    metadata: dict[str, object] = {}
    for _ in range(entries):
        key = _text(header.string())
        value = header.value(int(header.unpack("I")))
        if value is not None:
            metadata[key] = _text(value) if isinstance(value, bytes) else value
    alignment = metadata.get("general.alignment")
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0:
        alignment = DEFAULT_ALIGNMENT
    end: int | None = 0
    names = []
    for _ in range(tensors):
        names.append(_text(header.string()))
        dims = [header.count() for _ in range(int(header.unpack("I")))]
        kind, offset = int(header.unpack("I")), header.count()
        size = _tensor_bytes(kind, dims)
        end = None if size is None or end is None else max(end, offset + size)
    start = header.file.tell()
    expected = None if end is None else start + (-start % alignment) + end
    return GGUFHeader(metadata, tuple(names)), expected


def check_gguf_file(path: Path) -> GGUFHeader | None:
    """Raise ModelError, naming what is wrong, for an empty file, one that is no GGUF, or one cut short; else what
    its header says (None for a header this reader does not follow: the conversion's reader says what it thinks)."""
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"cannot read GGUF file {path}: it is empty", hint=_REDOWNLOAD)
    with path.open("rb") as file:
        if file.read(4) != MAGIC:
            raise ModelError(
                f"cannot read GGUF file {path}: it is not a GGUF file (it does not start with 'GGUF')",
                hint="pass a .gguf file (llama.cpp's format), a Hugging Face model folder, or an alias",
            )
        version = file.read(4)
        order = ">" if len(version) == 4 and struct.unpack("<I", version)[0] & 0xFFFF == 0 else "<"
        try:
            header, expected = _read(_Header(file, order, size))
        except _CutShort:
            raise ModelError(
                f"cannot read GGUF file {path}: it is cut short in its header ({size} bytes)", hint=_REDOWNLOAD
            ) from None
        except _TooDeep:
            raise ModelError(
                f"cannot read GGUF file {path}: its metadata nests arrays more than {MAX_NESTING} deep"
                " (real GGUFs nest one or two)",
                hint=DAMAGED,
            ) from None
        except (ValueError, struct.error):
            return None
    if expected is not None and size < expected:
        raise ModelError(
            f"cannot read GGUF file {path}: it is cut short (a complete file has {expected} bytes, this one {size})",
            hint=_REDOWNLOAD,
        )
    return header
