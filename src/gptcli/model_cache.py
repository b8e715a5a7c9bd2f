"""Removing a model from gptcli's cache (`gptcli models rm`): its converted folder, its pulled download and
the ONNX exports made from it. Nothing outside the cache is ever touched: a model given as a path is refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptcli.atomicio import remove_whole
from gptcli.errors import InputError, ModelError
from gptcli.export.cache import exports_of
from gptcli.models import catalogue_entry, catalogue_name, folder_size, remove_abandoned_copies
from gptcli.paths import models_dir


@dataclass(frozen=True)
class Removed:
    name: str
    folders: list[Path]
    size_bytes: int
    still_installed: bool  # a catalogue model whose package is installed: the next run converts it again


def remove_model(ref: str) -> Removed:
    """Delete every cached copy of the model `ref` names (a catalogue name, an alias, or a cache entry of
    `gptcli models list`); a ModelError when there is none (exit 5, as `models info` of an unknown model). Each
    folder is renamed aside, then deleted: a kill leaves a whole model or a hidden folder (deleted by the next rm,
    list or pull), never a damaged model."""
    remove_abandoned_copies()
    name = catalogue_name(ref) or ref
    converted = models_dir() / name
    if not name or name in {".", ".."} or converted.resolve().parent != models_dir().resolve():
        raise InputError(f"{ref!r} is not a name in gptcli's cache", hint="`gptcli models list` shows the names")
    entry = catalogue_entry(name)
    pulled = entry.pulled_dir() if entry is not None else None
    folders = [folder for folder in (converted, pulled) if folder is not None and folder.is_dir()]
    folders += exports_of(converted) if converted.is_dir() else []
    if not folders:
        raise ModelError(f"{ref} is not in the cache", hint="`gptcli models list` shows what is")  # as models info
    size = sum(folder_size(folder) for folder in folders)
    for folder in folders:
        remove_whole(folder)
    return Removed(name, folders, size, entry is not None and entry.gguf_path() is not None)
