"""Reading user text: UTF-8 only, binary files refused, each failure a one-line InputError (exit 6)."""

from __future__ import annotations

from pathlib import Path

from gptcli.errors import InputError


def decode_text(data: bytes, where: str) -> str:
    if b"\x00" in data[:65536]:
        raise InputError(f"{where} looks like a binary file (it has NUL bytes)", hint="pass a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{where} is not valid UTF-8 (byte {exc.start})", hint="convert it, e.g. iconv -t UTF-8"
        ) from None


def read_text_file(path: Path) -> str:
    """Read a UTF-8 text file, or fail with a one-line InputError."""
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a file", hint="pass a text file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"file not found: {path}", hint="check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    return decode_text(data, str(path))
