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


AVX2_ONLY = hardware.CpuIsa.from_flags({"avx2", "fma"})
AVX512_BF16 = hardware.CpuIsa.from_flags({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"})
AMX = hardware.CpuIsa.from_flags({"avx2", "fma", "avx512f", "amx_bf16", "amx_tile"})


def test_dtype_auto_on_a_cpu_is_bf16_only_where_the_cpu_computes_it():
    torch = pytest.importorskip("torch")
    for isa in (AVX512_BF16, AMX):
        choice = hardware.cpu_dtype("auto", isa)
        assert (choice.dtype, choice.warning) == ("bfloat16", None) and "natively" in choice.reason
        assert hardware.resolve_dtype("auto", "cpu", isa) == torch.bfloat16
        assert hardware.resolve_dtype("bfloat16", "cpu", isa) == torch.bfloat16
        assert hardware.cpu_dtype("bfloat16", isa).warning is None
    choice = hardware.cpu_dtype("auto", AVX2_ONLY)
    assert (choice.dtype, choice.warning) == ("float32", None) and "no native bf16" in choice.reason
    assert hardware.resolve_dtype("auto", "cpu", AVX2_ONLY) == torch.float32
    assert hardware.resolve_dtype("float32", "cpu", AVX512_BF16) == torch.float32  # an explicit choice stands


def test_bf16_asked_for_where_it_is_emulated_warns_with_the_cost():
    choice = hardware.cpu_dtype("bfloat16", AVX2_ONLY)
    assert choice.dtype == "bfloat16"  # still honoured
    assert choice.warning and "emulates bfloat16" in choice.warning
    assert f"~{hardware.EMULATED_BF16_SLOWDOWN}x slower than float32" in choice.warning
    assert hardware.cpu_dtype("float32", AVX2_ONLY).warning is None


def test_isa_summary_names_the_flags_and_the_choice():
    summary = hardware.isa_summary(AVX2_ONLY)
    assert summary["cpu_isa"] == ["avx2", "fma"] and summary["torch_cpu_dtype_auto"] == "float32"
    assert hardware.isa_summary(AMX)["torch_cpu_dtype_auto"] == "bfloat16"


@pytest.mark.parametrize(
    ("isa", "requested", "dtype", "warns"),
    [
        (AVX2_ONLY, "auto", "float32", False),
        (AVX2_ONLY, "bfloat16", "bfloat16", True),
        (AVX512_BF16, "auto", "bfloat16", False),
    ],
)
def test_torch_backend_follows_the_cpu_choice_and_warns(tiny_models, monkeypatch, isa, requested, dtype, warns):
    from gptcli.backends.base import LoadOptions
    from gptcli.backends.torch_backend import TorchBackend

    monkeypatch.setattr(hardware, "cpu_isa", lambda: isa)
    notes: list[str] = []
    options = LoadOptions(device="cpu", dtype=requested, threads=1, extra={"notify": notes.append})
    backend = TorchBackend.load(tiny_models["llama"], options)
    assert backend.info.dtype == dtype
    assert bool(notes) == warns and all("slower than float32" in note for note in notes)
    logits, _ = backend.forward([3, 5, 7], backend.new_cache())
    assert logits.shape == (backend.info.vocab_size,)


def test_dtype_auto_stays_float32_on_transformers_engine(tiny_models, monkeypatch):
    from gptcli.backends.base import LoadOptions
    from gptcli.backends.torch_backend import TorchBackend

    monkeypatch.setattr(hardware, "cpu_isa", lambda: AVX512_BF16)
    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "hf")  # its bf16 linear layers are slower than float32 on a CPU
    backend = TorchBackend.load(tiny_models["llama"], LoadOptions(device="cpu", dtype="auto", threads=1))
    assert backend.implementation == "hf" and backend.info.dtype == "float32"


def test_backends_json_and_bench_environment_say_what_auto_picks(capsys):
    from gptcli.backends import int4_native, int8_native, native_attention
    from gptcli.backends.int8_native import reported_choice
    from gptcli.bench.environment import environment

    assert run(["backends", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    expected = hardware.isa_summary()
    int8 = reported_choice(hardware.default_threads())  # this machine's (no int8 model loaded in this home yet)
    int4 = int4_native.reported_choice(hardware.default_threads())
    assert rows["torch"]["auto"] == {
        **expected,
        "float32_one_row_kernel": None,  # nothing decoded in this home yet
        "float32_one_row_reason": "measured when a model is first decoded here",
        "int8_kernel": int8["kernel"],
        "int8_kernel_reason": int8["reason"],
        "int4_kernel": int4["kernel"],
        "int4_kernel_reason": int4["reason"],
        "attention": "gptcli-native" if int8_native.unavailable_reason() is None else "sdpa",
        "attention_reason": native_attention.reported()["reason"],
    }
    env = environment()
    assert env["torch_cpu_dtype_auto"] == expected["torch_cpu_dtype_auto"] and env["cpu_isa"] == expected["cpu_isa"]
    assert env["torch_int8_kernel"] == int8["kernel"] and env["torch_int4_kernel"] == int4["kernel"]
    assert env["torch_attention"] == rows["torch"]["auto"]["attention"]


def test_backends_json_says_why_attention_keeps_sdpa(monkeypatch):
    from gptcli.backends import native_attention

    monkeypatch.setenv("GPTCLI_NATIVE_KERNELS", "0")
    assert native_attention.reported() == {
        "kernel": "sdpa",
        "reason": "torch's SDPA: turned off by GPTCLI_NATIVE_KERNELS=0",
    }


def test_default_threads_counts_the_physical_cores_under_our_cpus(tmp_path, monkeypatch):
    import os

    for cpu, core in enumerate([0, 0, 1, 1]):  # two cores with two hyper-threads each
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    for affinity, cores in (({0, 1, 2, 3}, 2), ({0, 2}, 2), ({0, 1}, 1), ({3}, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, cpus=affinity: cpus)
        assert hardware._physical_cores_in_use(tmp_path) == cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 7})  # cpu7 has no topology here
    assert hardware._physical_cores_in_use(tmp_path) is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setattr(hardware, "_physical_cores_in_use", lambda: 1)
    assert hardware.default_threads() == 1  # one core's two hyper-threads: one thread
