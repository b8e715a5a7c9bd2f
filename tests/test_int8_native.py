"""gptcli's own int8 kernel for the torch backend (backends/int8_native.py, int8_native.c): built with the
system's C compiler, exact per row, chosen per machine, and torch's kernel wherever it cannot be had."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from gptcli import tuning
from gptcli.backends import int4_native, int8_native, lean_quant, native_build
from gptcli.backends.int8_native import NativeInt8
from gptcli.errors import ConfigError
from gptcli.hardware import cpu_flags
from gptcli.tuning import kernel_flags, tuning_file

HAS_AVX2 = {"avx2", "fma"} <= set(kernel_flags())
HAS_VNNI = {"avx512f", "avx512bw", "avx512_vnni"} <= set(kernel_flags())
HAS_AVX_VNNI = {"avx2", "fma", "f16c", "avx_vnni"} <= cpu_flags()
CAN_BUILD = HAS_AVX2 and native_build.compiler() is not None
needs_build = pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 CPU or no C compiler here")
needs_vnni = pytest.mark.skipif(not (CAN_BUILD and HAS_VNNI), reason="needs an AVX-512 VNNI CPU and a C compiler")
needs_avx_vnni = pytest.mark.skipif(not (CAN_BUILD and HAS_AVX_VNNI), reason="needs an AVX-VNNI CPU and a C compiler")
# The AVX2 path, built on any AVX2 CPU (an AVX-512 one too); the AVX-VNNI one, on a CPU that has it.
AVX2_FLAGS = (*int8_native.BUILD_FLAGS, *int8_native.ISA_BUILDS[-1][1])
AVX_VNNI_FLAGS = (*int8_native.BUILD_FLAGS, *int8_native.ISA_BUILDS[1][1])


@pytest.fixture(autouse=True)
def fresh_loads():
    int8_native._load.cache_clear()
    yield
    int8_native._load.cache_clear()


def _native() -> NativeInt8:
    native = int8_native.native_kernel()
    assert isinstance(native, NativeInt8), native
    return native


def _avx2(tmp_path: Path) -> NativeInt8:
    cc = native_build.compiler()
    library = native_build.built_library(int8_native.SOURCE, cc, AVX2_FLAGS, tmp_path, "avx2", "gptcli_int8_isa")
    native = NativeInt8(library)
    assert native.isa == 1
    return native


def _avx_vnni(tmp_path: Path) -> NativeInt8:
    cc = native_build.compiler()
    flags = AVX_VNNI_FLAGS
    library = native_build.built_library(int8_native.SOURCE, cc, flags, tmp_path, "avxvnni", "gptcli_int8_isa")
    native = NativeInt8(library)
    assert native.isa == 3 and native.name.endswith("(AVX-VNNI)")
    return native


# GPTCLI_NATIVE_ISA's narrower paths (a wider CPU builds and runs them too), each with the name a kernel gives it
NARROWER = [
    pytest.param("avx2", "AVX2", id="avx2"),
    pytest.param(
        "avxvnni", "AVX-VNNI", id="avxvnni", marks=pytest.mark.skipif(not HAS_AVX_VNNI, reason="no AVX-VNNI CPU")
    ),
]


def _narrow(switch: str, tmp_path: Path) -> NativeInt8:
    """The library of one of the NARROWER paths, built in tmp_path."""
    return {"avx2": _avx2, "avxvnni": _avx_vnni}[switch](tmp_path)


def _script(tmp_path: Path, name: str, body: str) -> str:
    script = tmp_path / name
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return str(script)


def _kernels(tmp_path: Path) -> list[NativeInt8]:
    """Every path this CPU runs: AVX-512 VNNI, AVX2 and AVX-VNNI where it has them."""
    return [*([_native()] if HAS_VNNI else []), _avx2(tmp_path), *([_avx_vnni(tmp_path)] if HAS_AVX_VNNI else [])]


def _case(n: int, k: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    scales = torch.rand(n, generator=generator) / 100 + 1e-3
    x = torch.randn(m, k, generator=generator)
    x[0, 0] = 40.0  # an outlier: the row's scale follows it, the rest keep their bits
    return codes, scales, x


@needs_avx_vnni
def test_the_avx_vnni_path_gives_the_avx2_paths_bits(tmp_path):
    """vpdpbusd sums what vpmaddubsw + vpmaddwd sum (no pair saturates at 7-bit halves): the same integers."""
    vnni, avx2 = _avx_vnni(tmp_path / "vnni"), _avx2(tmp_path / "avx2")
    for seed, (n, k, m) in enumerate(((40, 36, 1), (577, 1000, 3), (16, 64, 9), (3, 7, 2))):
        codes, scales, x = _case(n, k, m, seed)
        x[-1, 0] = float("nan") if m > 1 else x[-1, 0]
        y = vnni.mm(x, vnni.pack(codes, scales))
        assert torch.equal(y.view(torch.int32), avx2.mm(x, avx2.pack(codes, scales)).view(torch.int32)), (n, k, m)


@needs_build
@pytest.mark.parametrize(("n", "k"), [(40, 36), (577, 1000), (5, 4), (16, 64), (3, 7)])
def test_products_match_float64_and_each_row_alone(tmp_path, n, k):
    for native in _kernels(tmp_path):
        for seed, m in enumerate((1, 2, 3, 4, 5, 9)):
            codes, scales, x = _case(n, k, m, seed)
            packed = native.pack(codes, scales)
            y = native.mm(x, packed)
            expected = (x.double() @ codes.double().t()) * scales.double()
            assert y.shape == (m, n) and y.dtype == torch.float32
            error = ((y.double() - expected).norm() / expected.norm()).item()
            # 14-16 bits a row (torch's kernel takes bf16 activations: ~3e-3 here)
            assert error < (5e-4 if native.isa == 2 else 2e-3), (native.name, n, k, m, error)  # 16 or 14 bits
            rows_alone = torch.cat([native.mm(x[i : i + 1], packed) for i in range(m)])
            assert torch.equal(y, rows_alone), (native.name, n, k, m)  # bit for bit: batching changes nothing


@needs_build
def test_a_row_with_nan_or_inf_is_nan_and_the_others_are_untouched(tmp_path):
    for native in _kernels(tmp_path):
        codes, scales, x = _case(48, 40, 4, 7)
        x[1, 5] = float("nan")
        x[2, 0] = float("inf")
        x[3] = 0.0
        y = native.mm(x, native.pack(codes, scales))
        assert y[1].isnan().all() and y[2].isnan().all()
        assert torch.equal(y[3], torch.zeros(48))
        assert torch.isfinite(y[0]).all()
        assert torch.equal(y[0], native.mm(x[:1], native.pack(codes, scales))[0])


@needs_build
def test_packed_rows_are_the_codes_and_a_three_dimensional_input_keeps_its_shape():
    native = _native()
    codes, scales, x = _case(37, 20, 6, 3)
    packed = native.pack(codes, scales)
    ids = torch.tensor([0, 36, 15, 16, 5])
    assert torch.equal(packed.rows(ids), codes[ids])
    y = native.mm(x.reshape(2, 3, 20).to(torch.bfloat16), packed)
    assert y.shape == (2, 3, 37) and y.dtype == torch.float32


@needs_build
def test_rows_of_tiny_values_keep_their_signs(tmp_path):
    for native in _kernels(tmp_path):
        codes, scales, x = _case(40, 36, 5, 11)
        for i, peak in enumerate((1e-30, 9e-35, 1e-38, 1e-40, 1e-44)):
            x[i] = x[i] / x[i].abs().max() * peak  # past ~1e-34 the row's 1/scale would overflow a float
        y = native.mm(x, native.pack(codes, scales)).double()
        expected = (x.double() @ codes.double().t()) * scales.double()
        for i in range(4):  # (1e-44 is a subnormal with 3 significant bits: only its sign is kept)
            error = ((y[i] - expected[i]).norm() / expected[i].norm()).item()
            assert error < 2e-3, (native.name, i, error)
        assert (torch.sign(y[4]) == torch.sign(expected[4])).float().mean() > 0.9


@needs_build
def test_the_library_and_its_digest_are_built_into_the_cache(own_kernels):
    _native()
    (library,) = own_kernels.glob("int8-*.so")
    assert native_build.intact(library)


@needs_build
def test_gptcli_kernels_dir_names_where_the_library_is_built(monkeypatch, tmp_path, own_kernels):
    monkeypatch.setenv("GPTCLI_KERNELS_DIR", str(tmp_path / "shared"))
    _native()
    (library,) = (tmp_path / "shared").glob("int8-*.so")
    assert native_build.intact(library) and not own_kernels.exists()


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 CPU")
def test_without_a_compiler_or_switched_off_int8_runs_on_torch_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = int8_native.native_kernel()
    assert isinstance(reason, str) and "no C compiler" in reason
    assert int8_native.native_for(1000) is None
    matrix = lean_quant.quantize_matrix(torch.randn(64, 48), 8, native=int8_native.native_for(1000))
    assert isinstance(matrix, lean_quant.Int8Matrix) and matrix.native is None
    monkeypatch.undo()
    monkeypatch.setenv(int8_native.OFF_SWITCH, "0")
    assert int8_native.native_kernel() == f"turned off by {int8_native.OFF_SWITCH}=0"
    said = int8_native.reported_choice(1)  # what `gptcli backends --json` says, with nothing built
    assert said == {"kernel": "torch", "reason": "torch's _weight_int8pack_mm: turned off by GPTCLI_NATIVE_KERNELS=0"}
    monkeypatch.setenv(int8_native.OFF_SWITCH, "Off")  # the words every on/off variable takes
    assert int8_native.native_kernel() == "turned off by GPTCLI_NATIVE_KERNELS=Off"


def test_a_switch_value_that_is_neither_on_nor_off_is_a_config_error(monkeypatch, tiny_models):
    from tests.conftest import run_cli

    monkeypatch.setenv(int8_native.OFF_SWITCH, "of")
    with pytest.raises(ConfigError, match="GPTCLI_NATIVE_KERNELS must be 1 or 0"):
        int8_native.native_for(1000)
    assert "must be 1 or 0" in int8_native.reported_choice(1)["reason"]  # `backends --json` says it, runs on
    done = run_cli(
        "generate", "hi", "-n", "2", "-m", str(tiny_models["llama"]), "--backend", "torch", "--precision", "int8"
    )
    assert done.returncode == 3 and b"GPTCLI_NATIVE_KERNELS must be 1 or 0" in done.stderr


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 CPU")
def test_a_failed_build_is_recorded_said_and_not_tried_again(monkeypatch, tmp_path):
    runs = tmp_path / "runs"
    cc = _script(tmp_path, "bad-cc", f"echo run >> {runs}\necho 'bad-cc: error: cannot do this' >&2\nexit 1\n")
    monkeypatch.setenv("CC", cc)
    reason = int8_native.native_kernel()
    assert reason == "could not build it: bad-cc failed: bad-cc: error: cannot do this"
    tried = len(runs.read_text().splitlines())  # each path this CPU has (AVX-512, then AVX2)
    int8_native._load.cache_clear()  # a later process
    assert int8_native.native_kernel() == reason
    assert len(runs.read_text().splitlines()) == tried  # recorded: the compiler was not run again
    said = int8_native.reported_choice(1)
    assert said == {"kernel": "torch", "reason": f"torch's _weight_int8pack_mm: {reason}"}
    assert not list(Path(os.environ["GPTCLI_HOME"]).rglob(".building-*"))


@needs_build
def test_a_compiler_that_hangs_on_one_isa_is_waited_for_once(monkeypatch, tmp_path):
    monkeypatch.setattr(native_build, "BUILD_TIMEOUT_S", 1)
    runs = tmp_path / "runs"
    real = " ".join(native_build.compiler())
    cc = _script(
        tmp_path,
        "hang-cc",
        f'echo run >> {runs}\ncase "$*" in *-mavx512vnni*|*-mavx2*) sleep 30;; esac\nexec {real} "$@"\n',
    )
    monkeypatch.setenv("CC", cc)
    reason = int8_native.native_kernel()
    assert reason == "could not build it: hang-cc took over 1 s"
    assert len(runs.read_text().splitlines()) == 1  # not tried again with the next ISA's flags
    int8_native._load.cache_clear()
    assert int8_native.native_kernel() == reason
    assert len(runs.read_text().splitlines()) == 1  # nor in a later process


@pytest.mark.skipif(not (CAN_BUILD and HAS_VNNI), reason="needs an AVX-512 VNNI CPU and a C compiler")
def test_a_compiler_without_avx512_builds_the_avx2_path_and_is_not_asked_again(monkeypatch, tmp_path):
    """An old compiler knows neither the AVX-512 VNNI flags nor AVX-VNNI's (GCC 11+): the AVX2 path, built once."""
    runs = tmp_path / "runs"
    real = " ".join(native_build.compiler())
    refuse = 'case "$*" in *-mavx512vnni*|*-mavxvnni*) exit 1;; esac'
    cc = _script(tmp_path, "old-cc", f'echo "$*" >> {runs}\n{refuse}\nexec {real} "$@"\n')
    monkeypatch.setenv("CC", cc)
    assert int8_native.native_kernel().isa == 1
    int8_native._load.cache_clear()
    assert int8_native.native_kernel().isa == 1
    lines = runs.read_text().splitlines()
    assert sum("-mavx512vnni" in line for line in lines) == 1  # its failure is recorded
    assert sum("-mavxvnni" in line for line in lines) == (1 if HAS_AVX_VNNI else 0)


@needs_build
def test_where_torch_was_chosen_nothing_is_built(monkeypatch, own_kernels):
    monkeypatch.setattr(int8_native, "measure", lambda native, n: {"kernel": "torch", "reason": "torch's was faster"})
    assert int8_native.native_for(int8_native.MIN_PARAMS) is None  # built, timed: torch's
    kernels = own_kernels
    for built in kernels.iterdir():
        built.unlink()
    int8_native._load.cache_clear()
    assert int8_native.native_for(int8_native.MIN_PARAMS) is None
    assert list(kernels.iterdir()) == []


@needs_build
def test_a_compiler_that_builds_something_else_is_a_failed_build(monkeypatch, tmp_path):
    other = tmp_path / "other.c"
    other.write_text("int unrelated(void) { return 1; }\n")
    real = " ".join(native_build.compiler())
    cc = _script(
        tmp_path, "wrong-cc", f'while [ "$1" != "-o" ]; do shift; done\n{real} -shared -fPIC -o "$2" {other}\n'
    )
    monkeypatch.setenv("CC", cc)
    reason = int8_native.native_kernel()
    assert isinstance(reason, str) and "has no gptcli_int8_isa in it" in reason


@pytest.mark.parametrize(
    ("module", "kernel_for", "kind"),
    [
        pytest.param(int8_native, "native_for", "NativeInt8", marks=needs_build),
        pytest.param(int4_native, "native4_for", "NativeInt4", marks=needs_vnni),
    ],
)
def test_a_model_large_enough_measures_once_and_keeps_the_choice(monkeypatch, module, kernel_for, kind):
    calls = []

    def measure(native, threads):
        calls.append(threads)
        return {"kernel": int8_native.TORCH, "timings_ms": {}, "reason": "measured: torch's was faster"}

    monkeypatch.setattr(module, "measure", measure)
    kernel_for = getattr(module, kernel_for)
    assert kernel_for(int8_native.MIN_PARAMS) is None  # the record says torch
    assert kernel_for(int8_native.MIN_PARAMS) is None
    assert len(calls) == 1
    record = json.loads(tuning_file().read_text())[module.TUNING_NAME]
    assert [r["reason"] for r in record.values()] == ["measured: torch's was faster"]
    assert module.cached_choice(torch.get_num_threads())["kernel"] == int8_native.TORCH
    assert module.reported_choice(torch.get_num_threads())["kernel"] == int8_native.TORCH
    assert type(kernel_for(1000)).__name__ == kind  # a tiny model takes it unmeasured


@needs_build
def test_a_damaged_choice_is_measured_again_and_never_shown(monkeypatch):
    threads = torch.get_num_threads()
    tuning_file().parent.mkdir(parents=True, exist_ok=True)
    tuning_file().write_text(
        json.dumps({int8_native.TUNING_NAME: {int8_native.machine_key(threads): {"kernel": "bogus"}}})
    )
    assert int8_native.cached_choice(threads) is None
    assert int8_native.reported_choice(threads)["kernel"] is None
    monkeypatch.setattr(int8_native, "measure", lambda native, n: {"kernel": "torch", "reason": "measured again"})
    assert int8_native.native_for(int8_native.MIN_PARAMS) is None
    assert int8_native.cached_choice(threads)["reason"] == "measured again"


@needs_build
def test_the_real_measurement_names_a_kernel_and_its_reason():
    record = int8_native.measure(_native(), 1)
    assert record["kernel"] in (int8_native.NATIVE, int8_native.TORCH)
    assert set(record["timings_ms"]) == {"1 row", f"{int8_native.PREFILL_ROWS} rows"}
    assert all(set(times) == {int8_native.NATIVE, int8_native.TORCH} for times in record["timings_ms"].values())
    assert "1 threads" in record["reason"]


def test_a_faster_decode_must_not_cost_the_prefill():
    native, torch_ = int8_native.NATIVE, int8_native.TORCH
    assert int8_native.prefer_native({native: 1.0, torch_: 1.7}, {native: 7.6, torch_: 18.5})  # AVX-512 VNNI here
    # the AVX2 path on the same CPU: faster at one row, 1.37x slower at 64: torch's kernel
    assert not int8_native.prefer_native({native: 1.06, torch_: 1.69}, {native: 31.0, torch_: 22.7})
    assert not int8_native.prefer_native({native: 1.8, torch_: 1.7}, {native: 7.0, torch_: 18.0})


def test_a_choice_timed_on_a_busy_machine_holds_for_this_run_only(monkeypatch):
    """Another process on one of two cores stalled every OpenMP region: both kernels took ~370 ms for what takes 1,
    torch's won by chance, and the record kept torch's kernel at 1.6x slower decoding for good."""
    native, torch_ = int8_native.NATIVE, int8_native.TORCH
    stalled = {"1 row": {native: 371.3, torch_: 368.7}, "64 rows": {native: 364.3, torch_: 770.9}}
    weight_bytes = sum(n * k for n, k in int8_native.SHAPES)
    record = int8_native.verdict(stalled, "int8", "ours", "theirs", 2, weight_bytes)
    assert record["provisional"] and record["reason"].endswith("timed again at the next load)")
    calm = {"1 row": {native: 0.98, torch_: 1.80}, "64 rows": {native: 8.0, torch_: 19.5}}
    assert "provisional" not in int8_native.verdict(calm, "int8", "ours", "theirs", 2, weight_bytes)
    timings = iter([record, {**record, "provisional": False, "reason": "calm"}])
    monkeypatch.setattr(int8_native, "measure", lambda native, threads: next(timings))
    assert tuning.tuned("choice", "key", lambda: int8_native.measure(None, 2))["provisional"]
    assert tuning.cached("choice", "key") is None  # not kept: the next load times it again
    assert tuning.tuned("choice", "key", lambda: int8_native.measure(None, 2))["reason"] == "calm"
    assert tuning.cached("choice", "key")["reason"] == "calm"


@needs_build
def test_the_tiny_models_int8_path_runs_the_native_kernel_and_ties_the_embedding(tiny_models):
    from gptcli.backends.base import LoadOptions
    from gptcli.backends.torch_backend import TorchBackend

    options = LoadOptions(device="cpu", dtype="float32", precision="int8", threads=1)
    lean = TorchBackend.load(tiny_models["llama"], options).engine.lean
    assert isinstance(lean.head, lean_quant.Int8Matrix) and lean.head.native is not None
    assert lean.embed.matrix is lean.head
    ids = torch.tensor([[1, 2], [3, 0]])
    rows = lean.embed[ids]
    expected = lean.head.dequantized().t()[ids]
    assert rows.shape == (2, 2, lean.head.in_features)
    assert torch.allclose(rows, expected)


def test_the_source_ships_with_the_package():
    assert int8_native.SOURCE.is_file()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"backends/*.c"' in pyproject  # package data: a wheel carries the source it builds from
