"""gptcli.hardware: one answer to "is CUDA usable here", CPU facts, and `--device auto` in export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gptcli import hardware
from gptcli.cli.app import run
from gptcli.errors import BackendError
from gptcli.models import ONNX_EXPORT_SIDECAR as SIDECAR


def test_importing_hardware_imports_no_runtime():
    code = "import sys, gptcli.hardware; print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_listed_cuda_provider_without_a_driver_or_gpu_is_not_usable(monkeypatch):
    import ctypes

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    class NoGpu:
        def cuInit(self, flags):
            return 0

        def cuDeviceGetCount(self, count):
            return 0  # success, and the count stays 0

    hardware.nvidia_gpu_reason.cache_clear()
    try:
        monkeypatch.setattr(ctypes, "CDLL", no_library)
        assert "no NVIDIA driver" in hardware.nvidia_gpu_reason()
        hardware.nvidia_gpu_reason.cache_clear()
        monkeypatch.setattr(ctypes, "CDLL", lambda name: NoGpu())
        assert "no usable GPU" in hardware.nvidia_gpu_reason()
    finally:
        hardware.nvidia_gpu_reason.cache_clear()


def _cuda_provider_listed_but_no_gpu(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [hardware.CUDA_PROVIDER, "CPUExecutionProvider"])
    monkeypatch.setattr(hardware, "nvidia_gpu_reason", lambda: "the NVIDIA driver reports no usable GPU")


def test_auto_device_needs_a_usable_gpu_not_just_a_listed_provider(monkeypatch):
    _cuda_provider_listed_but_no_gpu(monkeypatch)
    assert hardware.cuda_unusable_reason(hardware.ONNXRUNTIME) == "the NVIDIA driver reports no usable GPU"
    assert hardware.resolve_device("auto", hardware.ONNXRUNTIME) == "cpu"
    assert hardware.resolve_device("cpu", hardware.ONNXRUNTIME) == "cpu"
    with pytest.raises(BackendError, match="CUDA requested but the NVIDIA driver reports no usable GPU"):
        hardware.resolve_device("cuda", hardware.ONNXRUNTIME)
    monkeypatch.setattr(hardware, "nvidia_gpu_reason", lambda: None)
    assert hardware.resolve_device("auto", hardware.ONNXRUNTIME) == "cuda"


def test_export_device_auto_builds_a_cpu_export_when_cuda_is_listed_but_unusable(
    tiny_models, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("onnxruntime")
    _cuda_provider_listed_but_no_gpu(monkeypatch)
    out = tmp_path / "int8"
    code = run(["export", str(tiny_models["gpt2"]), "--precision", "int8", "--output", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    assert json.loads((out / SIDECAR).read_text())["device"] == "cpu"


def test_cpu_isa_from_flags():
    isa = hardware.CpuIsa.from_flags({"fma", "avx2", "avx512f", "avx512_vnni", "amx_tile"})
    assert (isa.avx2, isa.avx512f, isa.avx512_vnni, isa.avx512_bf16, isa.amx) == (True, True, True, False, True)
    assert hardware.cpu_flops_per_cycle(isa) == (64, "AVX-512 FMA")
    assert hardware.cpu_flops_per_cycle(hardware.CpuIsa(avx2=True, fma=True)) == (32, "AVX2 FMA")
    assert hardware.cpu_flops_per_cycle(hardware.CpuIsa()) == (16, "SSE/NEON")


def test_torch_threads_are_restored():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    with hardware.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
