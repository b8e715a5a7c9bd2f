"""gptcli's own int4 kernel for the torch backend (backends/int4_native.py, the int4 part of int8_native.c): exact
integer sums per group of 32, a row's bits the same in any batch and on either path (AVX-512 VNNI, AVX2), chosen per
machine, torch's kernel elsewhere."""

from __future__ import annotations

import pytest
import torch

from gptcli import tuning
from gptcli.backends import int4_native, int8_native, lean_quant
from gptcli.backends.int4_native import NativeInt4
from gptcli.errors import ConfigError
from tests.test_int8_native import HAS_AVX_VNNI, NARROWER, _narrow, _native, fresh_loads, needs_build, needs_vnni

__all__ = ["fresh_loads"]  # int8_native's autouse fixture: each test loads the library anew


def _native4() -> NativeInt4:
    native = int4_native.native_int4(_native())
    assert native is not None
    return native


def _case(n: int, k: int, m: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=generator)
    scales = torch.rand(n, k // 32, generator=generator) / 100 + 1e-3
    lows = -8 * scales + torch.randn(n, k // 32, generator=generator) / 1000
    x = torch.randn(m, k, generator=generator)
    x[0, 0] = 40.0  # an outlier: the row's scale follows it
    return codes, scales, lows, x


def _float64(codes: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor) -> torch.Tensor:
    """The [out, in] matrix the kernel stands for: its scales and minimums as the float16 it keeps."""
    n, k = codes.shape
    grouped = codes.double().reshape(n, k // 32, 32)
    return (grouped * scales.half().double()[..., None] + lows.half().double()[..., None]).reshape(n, k)


@needs_build
@pytest.mark.parametrize(("n", "k"), [(16, 32), (40, 64), (3, 96), (577, 1024)])
def test_products_match_float64_and_each_row_alone(n, k):
    native = _native4()
    for seed, m in enumerate((1, 2, 3, 4, 5, 9)):
        codes, scales, lows, x = _case(n, k, m, seed)
        packed = native.pack(codes, scales, lows)
        y = native.mm(x, packed)
        expected = x.double() @ _float64(codes, scales, lows).t()
        assert y.shape == (m, n) and y.dtype == torch.float32
        error = ((y.double() - expected).norm() / expected.norm()).item()
        assert error < 1.5e-3, (n, k, m, error)  # 15 bits a row, an outlier of 40 (torch's kernel, bf16: 2-4e-3)
        rows_alone = torch.cat([native.mm(x[i : i + 1], packed) for i in range(m)])
        assert torch.equal(y, rows_alone), (n, k, m)  # bit for bit: batching changes nothing
    assert native.mm(x.reshape(m, 1, k), packed).shape == (m, 1, n)


@needs_build
def test_rows_of_nan_zeros_and_tiny_values():
    native = _native4()
    codes, scales, lows, x = _case(48, 64, 4, 7)
    x[1, 5] = float("nan")
    x[2] = 0.0
    x[3] *= 1e-30  # past a float's range once divided by its 15-bit scale: scaled up first, exactly
    y = native.mm(x, native.pack(codes, scales, lows))
    assert y[1].isnan().all() and torch.equal(y[2], torch.zeros(48))
    expected = x[3].double() @ _float64(codes, scales, lows).t()
    assert ((y[3].double() - expected).norm() / expected.norm()).item() < 3e-4
    assert torch.isfinite(y[0]).all()


@needs_build
@pytest.mark.parametrize(("switch", "path"), NARROWER)
@pytest.mark.parametrize(("n", "k"), [(16, 32), (40, 64), (577, 1024)])
def test_the_narrower_paths_give_the_same_bits_as_the_widest(tmp_path, n, k, switch, path):
    """Same integers, same float operations in the same order: an AVX2-only CPU answers as an AVX-512 one does."""
    narrow = int4_native.native_int4(_narrow(switch, tmp_path))
    assert narrow is not None and narrow.name.endswith(f"({path})")
    widest = _native4()
    for seed, m in enumerate((1, 3, 4, 9)):
        codes, scales, lows, x = _case(n, k, m, seed)
        x[-1, 3] = float("nan") if m > 1 else x[-1, 3]
        y = narrow.mm(x, narrow.pack(codes, scales, lows))
        theirs = widest.mm(x, widest.pack(codes, scales, lows))
        assert torch.equal(y.view(torch.int32), theirs.view(torch.int32)), (n, k, m)  # bit for bit, NaN too
        finite = x[:-1].double() if m > 1 else x.double()
        expected = finite @ _float64(codes, scales, lows).t()
        error = ((y[: len(finite)].double() - expected).norm() / expected.norm()).item()
        assert error < 1.5e-3, (n, k, m, error)


@needs_build
def test_gptcli_native_isa_avx2_builds_and_runs_the_avx2_path_alone(monkeypatch):
    monkeypatch.setenv(int8_native.ISA_SWITCH, "avx2")
    assert int8_native.isa_builds() == [int8_native.ISA_BUILDS[-1][1]]
    assert _native4().name.endswith("(AVX2)")
    assert int4_native.onnx_op_choice()["reason"].startswith("gptcli's Int4MatMul (AVX2)")
    monkeypatch.setenv(int8_native.ISA_SWITCH, "sse")
    with pytest.raises(ConfigError, match="GPTCLI_NATIVE_ISA"):
        int8_native.isa_builds()


def test_gptcli_native_isa_avxvnni_runs_that_path_alone_and_refuses_a_cpu_without_it(monkeypatch):
    flags = {"avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}
    monkeypatch.setattr(int8_native, "cpu_flags", lambda: flags)
    assert int8_native.widest_path() == "AVX-512 VNNI"
    monkeypatch.setenv(int8_native.ISA_SWITCH, "avxvnni")
    assert int8_native.isa_builds() == [int8_native.ISA_BUILDS[1][1]]
    assert int8_native.widest_path() == "AVX-VNNI"
    monkeypatch.setattr(int8_native, "cpu_flags", lambda: {"avx2", "fma", "f16c"})  # an AVX2-only CPU without it
    with pytest.raises(ConfigError, match="this CPU cannot run that path"):
        int8_native.isa_builds()
    monkeypatch.delenv(int8_native.ISA_SWITCH)
    assert int8_native.widest_path() == "AVX2"


def test_switched_off_int4_runs_on_torchs_kernel(monkeypatch):
    monkeypatch.setenv(int8_native.OFF_SWITCH, "0")
    assert int4_native.native4_for(int8_native.MIN_PARAMS) is None
    said = int4_native.reported_choice(1)
    assert said["kernel"] == int8_native.TORCH and "GPTCLI_NATIVE_KERNELS=0" in said["reason"]


@needs_vnni
def test_where_the_avx512_build_failed_int4_runs_on_the_next_path():
    avx512 = next(flags for flags in int8_native.isa_builds() if "-mavx512vnni" in flags)
    tuning.store(int8_native.BUILD_FAILED, int8_native.failure_key(avx512), {"reason": "could not build it: boom"})
    native = int4_native.native4_for(int8_native.MIN_PARAMS - 1)  # (the next library, built now; unmeasured)
    assert native is not None and native.name.endswith("(AVX-VNNI)" if HAS_AVX_VNNI else "(AVX2)")


@needs_build
def test_the_real_measurement_names_a_kernel_and_its_reason():
    record = int4_native.measure(_native4(), 1)
    assert record["kernel"] in (int8_native.NATIVE, int8_native.TORCH)
    assert set(record["timings_ms"]) == {"1 row", f"{int8_native.PREFILL_ROWS} rows"}
    assert "int4 products" in record["reason"] and "1 threads" in record["reason"]


@needs_build
def test_a_matrix_past_float16s_range_stays_with_torchs_kernel():
    native = _native4()
    assert lean_quant.Int4Matrix(torch.randn(64, 32), native=native).native is native
    huge = torch.randn(64, 32) * 1e6  # its minimums are past float16's 65504
    kept = lean_quant.Int4Matrix(huge, native=native)
    assert kept.native is None
    x = torch.randn(2, 64)
    assert torch.allclose(kept.mm(x), x @ huge, rtol=0.1, atol=0.1 * (x @ huge).abs().max().item())


@needs_build
def test_a_matrix_of_tiny_weights_stays_with_torchs_kernel():
    """Its scales would be float16 subnormals (a step of 6e-8): at |w| ~ 1e-7 the product's error was 2x the
    product's size on gptcli's kernel, 8 % (the 4-bit rounding) on torch's (bf16 scales)."""
    native = _native4()
    tiny = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 1e-7
    kept = lean_quant.Int4Matrix(tiny, native=native)
    assert kept.native is None
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    assert (kept.mm(x) - x @ tiny).norm() < 0.2 * (x @ tiny).norm()


@needs_build
def test_the_tiny_models_int4_path_runs_the_native_kernel_and_batching_changes_nothing(tiny_models):
    from gptcli.backends.base import LoadOptions
    from gptcli.backends.torch_backend import TorchBackend

    options = LoadOptions(device="cpu", dtype="float32", precision="int4", threads=1)
    backend = TorchBackend.load(tiny_models["llama"], options)
    layer = backend.engine.lean.layers[0]
    assert isinstance(layer.gate_up, lean_quant.Int4Matrix) and layer.gate_up.native is not None
    ids = [[5, 9, 2, 7], [3, 1], [8]]
    alone = [backend.step([(seq, backend.new_cache())])[0][0] for seq in ids]
    together = backend.step([(seq, backend.new_cache()) for seq in ids])[0]
    for one, batched in zip(alone, together, strict=True):
        assert torch.equal(torch.as_tensor(one), torch.as_tensor(batched))
