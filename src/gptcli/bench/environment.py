"""Where a benchmark ran: CPU and GPU model, threads, package versions, git commit, date."""

from __future__ import annotations

import platform
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from gptcli.bench.roofline import cpu_model
from gptcli.hardware import default_threads, isa_summary, usable_cpus


def version_of(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def gpu_model() -> str | None:
    """The GPU's name from nvidia-smi, without importing torch (None when there is none)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return ", ".join(names) if out.returncode == 0 and names else None


def git_commit() -> str | None:
    """The commit of the checkout gptcli runs from (None for an installed wheel)."""
    source = Path(__file__).resolve().parents[3]
    if not (source / ".git").exists() or not shutil.which("git"):
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    from gptcli import __version__

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpus": usable_cpus(),
        "gpu": gpu_model(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gptcli": __version__,
        "torch": version_of("torch"),
        "onnxruntime": version_of("onnxruntime") or version_of("onnxruntime-gpu"),
        "transformers": version_of("transformers"),
        "numpy": version_of("numpy"),
        "git_commit": git_commit(),
        **isa_summary(),  # the CPU's ISA flags and what `--dtype auto` picks on torch here
        **measured_kernels(),
    }


def measured_kernels() -> dict[str, Any]:
    """The kernel choices this machine has measured (gptcli.tuning): None for one not measured yet."""
    from gptcli.backends import int4_native, native_attention
    from gptcli.backends.int8_native import reported_choice
    from gptcli.backends.lean_tuning import cached_choice

    one_row = cached_choice(default_threads())
    try:
        from gptcli.export.nbits_choice import cached_choice as nbits_choice

        nbits = nbits_choice()
    except ImportError:  # no onnxruntime
        nbits = None
    return {
        "torch_float32_one_row_kernel": one_row["kernel"] if one_row else None,
        "torch_int8_kernel": reported_choice(default_threads())["kernel"],
        "torch_int4_kernel": int4_native.reported_choice(default_threads())["kernel"],
        "torch_attention": native_attention.reported()["kernel"],
        "onnx_matmulnbits_accuracy_level": {f"int{b}": level for b, level in nbits.levels.items()} if nbits else None,
        "onnx_int4_kernel": int4_native.onnx_op_choice()["kernel"],
    }
