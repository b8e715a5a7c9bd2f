"""The export cache: ``cache_dir()/onnx/<source>-<precision>-<device>-<key>``, keyed by the source's files,
the precision, device, opset, graph version and library versions (a quantized CPU export also by the CPU's
kernel flags: its compute type is measured per machine, see nbits_choice); stale siblings are removed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from gptcli import __version__
from gptcli.export import graph
from gptcli.export.nbits_choice import machine_key
from gptcli.export.sidecar import SIDECAR_FILE
from gptcli.hf import CONFIG_FILE, weight_files
from gptcli.paths import cache_key as files_key
from gptcli.paths import exports_dir


def ort_version() -> str:
    """The installed ONNX Runtime's version (onnxruntime or onnxruntime-gpu: the same module), or "unknown"."""
    try:
        import onnxruntime  # what runs the export next: its import is not an extra cost
    except ImportError:
        return "unknown"
    return str(onnxruntime.__version__)


def source_fingerprint(folder: Path) -> str:
    """A cheap key for the source: where it is, and name, size and mtime of config.json and every weight file.

    The place is part of it: a copy keeps its files' stamps (cp -a), so a damaged or edited copy of a model
    would otherwise share, and could overwrite, the original's export."""
    return files_key(str(folder.resolve()), files=[folder / CONFIG_FILE, *weight_files(folder)], length=64)


def content_hash(folder: Path) -> str:
    """sha256 over config.json and every weight file's bytes (recorded in the sidecar)."""
    digest = hashlib.sha256()
    for file in [folder / CONFIG_FILE, *weight_files(folder)]:
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def cache_key(folder: Path, precision: str, device: str, native_int4: bool = False) -> str:
    """`native_int4`: an int4 CPU export with gptcli's Int4MatMul operator (it loads only where the backend has
    the kernel), kept apart from the plain MatMulNBits one."""
    # graph.GRAPH_VERSION is read at call time, so a bumped version (or a test patching it) takes effect.
    versions = [str(graph.OPSET), str(graph.GRAPH_VERSION), ort_version(), __version__]
    if precision in {"int8", "int4"} and device == "cpu":  # its compute type is chosen per machine
        versions.append(machine_key())
    if native_int4:
        versions.append("int4-op-8bit-head")  # (-8bit-head: the Q8_0 head on the operator too)
    return files_key(source_fingerprint(folder), precision, device, *versions)


def cached_export_dir(folder: Path, precision: str, device: str, native_int4: bool = False) -> Path:
    key = cache_key(folder, precision, device, native_int4)
    return exports_dir() / f"{folder.name}-{precision}-{device}-{key}"


def remove_stale_exports(current: Path, source: Path) -> None:
    """Older cached exports of the same source, precision, device and int4 kernel (a changed source or version).
    An int4 export on gptcli's operator and a plain MatMulNBits one are both kept: `GPTCLI_NATIVE_KERNELS=0` or a
    new timing of the two does not export again each time it changes its mind."""
    prefix = current.name.rsplit("-", 1)[0] + "-"
    kind = _int4_kernel(current)
    for sibling in current.parent.glob(prefix + "*"):
        if sibling == current or not sibling.is_dir():
            continue
        try:
            record = json.loads((sibling / SIDECAR_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if _int4_kernel(sibling, record) != kind:
            continue
        if Path(record.get("source", {}).get("path", "")).resolve() == source.resolve():
            shutil.rmtree(sibling, ignore_errors=True)


def _int4_kernel(export: Path, record: dict | None = None) -> object:
    """What an export's int4 weights run on ("Int4MatMul", "MatMulNBits"; None for other precisions)."""
    try:
        record = record if record is not None else json.loads((export / SIDECAR_FILE).read_text(encoding="utf-8"))
        return (record.get("quantization") or {}).get("int4_kernel")
    except (OSError, ValueError, AttributeError):
        return None


def exports_of(source: Path) -> list[Path]:
    """Every cached export made from the model folder `source` (its sidecar names where it came from)."""
    root = exports_dir()
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            record = json.loads((folder / SIDECAR_FILE).read_text(encoding="utf-8"))
            made_from = Path(record["source"]["path"]).resolve()
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if made_from == source.resolve():
            found.append(folder)
    return found
