"""A quick look at a GGUF file before its conversion: is it a GGUF at all, and is it all there?

A download cut short, or a copy that ran out of disk, made transformers' reader fail deep in numpy
("cannot reshape array of size 399424 into shape (576,960)"). The header says where the last tensor's
data ends; comparing that with the file's size takes milliseconds, where the conversion takes tens of seconds.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from gptcli.errors import ModelError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
# Fixed-size value types (GGUF's type id -> struct code); STRING and ARRAY are read piece by piece.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_REDOWNLOAD = "the file is incomplete (an interrupted download or copy?): download or copy it again"


class _CutShort(Exception):
    """The header asked for bytes past the end of the file."""


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

    def value(self, kind: int) -> object:
        """One metadata value of type `kind` (an array's items are skipped: only scalars are kept)."""
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item_kind, items = int(self.unpack("I")), self.count()
            if item_kind in _SCALARS:
                self.read(items * struct.calcsize(_SCALARS[item_kind]))
            else:
                for _ in range(items):
                    self.value(item_kind)
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


def _expected_size(header: _Header) -> int | None:
    """The byte where the last tensor's data ends, read from the header (None where it cannot tell)."""
    tensors, entries = header.count(), header.count()
    alignment = DEFAULT_ALIGNMENT
    for _ in range(entries):
        key = header.string()
        value = header.value(int(header.unpack("I")))
        if key == b"general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    end = 0
    for _ in range(tensors):
        header.string()
        dims = [header.count() for _ in range(int(header.unpack("I")))]
        kind, offset = int(header.unpack("I")), header.count()
        size = _tensor_bytes(kind, dims)
        if size is None:
            return None
        end = max(end, offset + size)
    start = header.file.tell()
    return start + (-start % alignment) + end


def check_gguf_file(path: Path) -> None:
    """Raise ModelError, naming what is wrong, for an empty file, one that is no GGUF, or one cut short."""
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
            expected = _expected_size(_Header(file, order, size))
        except _CutShort:
            raise ModelError(
                f"cannot read GGUF file {path}: it is cut short in its header ({size} bytes)", hint=_REDOWNLOAD
            ) from None
        except (ValueError, struct.error):
            return  # a header this reader does not follow: the conversion's reader says what it thinks
    if expected is not None and size < expected:
        raise ModelError(
            f"cannot read GGUF file {path}: it is cut short (a complete file has {expected} bytes, this one {size})",
            hint=_REDOWNLOAD,
        )
