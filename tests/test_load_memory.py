"""A model whose weights alone are more than the memory left is refused before it loads (exit 1, one line),
where the load would otherwise be killed by the kernel minutes later (exit 137) without a word."""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import pytest

from gptcli.backends.base import LoadOptions
from gptcli.backends.onnx_backend import OnnxBackend
from gptcli.backends.torch_backend import TorchBackend
from gptcli.errors import MemoryShortError
from gptcli.hardware import loadable_memory_bytes
from gptcli.runtime import check_memory
from tests.conftest import run_cli

GIANT_MLP = 16_000_000  # the widest MLP config.json may name: 3 x 16M x 64 = 3.07 G parameters a layer


def giant_copy(tiny: Path, folder: Path, layers: int) -> int:
    """`tiny` (the tiny Llama) with `layers` layers whose MLPs are GIANT_MLP wide, its weights a sparse file
    (no disk, no memory: nothing but the headers is read before the refusal); its parameter count."""
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    hidden = config["hidden_size"]
    config.update(intermediate_size=GIANT_MLP, num_hidden_layers=layers)
    (folder / "config.json").write_text(json.dumps(config))
    with open(folder / "model.safetensors", "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    shapes: dict[str, list[int]] = {}
    for name, spec in header.items():
        if name == "__metadata__" or (name.startswith("model.layers.") and not name.startswith("model.layers.0.")):
            continue
        shape = spec["shape"]
        if ".mlp." in name:
            shape = [hidden, GIANT_MLP] if name.endswith("down_proj.weight") else [GIANT_MLP, hidden]
        for layer in range(layers) if name.startswith("model.layers.0.") else [None]:
            shapes[name if layer is None else name.replace(".0.", f".{layer}.", 1)] = shape
    tensors, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        tensors[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps({"__metadata__": {"format": "pt"}, **tensors}).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)
    return sum(math.prod(shape) for shape in shapes.values())


@pytest.fixture(scope="module")
def giant(tiny_models, tmp_path_factory) -> Path:
    room = loadable_memory_bytes()
    if room is None:
        pytest.skip("the free memory is not known here (no /proc/meminfo)")
    layers = max(1, math.ceil(2 * room / (4 * 3 * GIANT_MLP * 64)))  # twice what is free, even as bfloat16
    folder = tmp_path_factory.mktemp("giant") / "giant"
    giant_copy(tiny_models["llama"], folder, layers)
    return folder


@pytest.mark.parametrize(
    ("flags", "held_as"),
    [
        ((), "float32"),  # --dtype auto is float32 on a CPU without bf16, bfloat16 on one with it
        (("--dtype", "bfloat16"), "bfloat16"),
        (("--precision", "int8"), "float32"),  # made from the float32 weights
        (("--backend", "onnx", "--precision", "int4"), "float32"),  # its export reads them as float32
    ],
)
def test_a_model_too_big_for_the_memory_is_refused_before_it_loads(giant, flags, held_as):
    start = time.monotonic()
    result = run_cli("generate", "-m", str(giant), "hi", "-n", "2", "--device", "cpu", *flags, timeout=60)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    first = err.splitlines()[0]
    if held_as == "float32" and not flags:
        held_as = "bfloat16" if "bfloat16" in first else "float32"
    assert first.startswith("error: giant's ") and f"of memory as {held_as}, but " in first, err
    assert "is free here" in first and err.splitlines()[1].startswith("hint: ") and "Traceback" not in err
    assert time.monotonic() - start < 30  # nothing was read but the headers


def test_export_and_serve_refuse_it_too(giant):
    exported = run_cli("export", str(giant), "--precision", "int8", "--device", "cpu", timeout=60)
    assert exported.returncode == 1 and "of memory as float32" in exported.stderr.decode(), exported.stderr
    # --dtype float32: auto is bfloat16 on a CPU that computes it (the test above covers auto)
    served = run_cli("serve", "-m", str(giant), "--port", "0", "--device", "cpu", "--dtype", "float32", timeout=60)
    assert served.returncode == 1 and "of memory as float32" in served.stderr.decode(), served.stderr


def test_the_floor_is_the_weights_as_each_load_holds_them(tiny_models, tmp_path, monkeypatch):
    """In process: the floor follows the backend, precision and dtype; a model that fits loads as before."""
    folder = tiny_models["llama"]
    params = 400 * 64 + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128 + 2 * 64) + 64  # the head is tied
    cpu = {"device": "cpu"}
    floors = {
        "torch float32": TorchBackend.memory_floor(folder, LoadOptions(dtype="float32", **cpu)),
        "torch bfloat16": TorchBackend.memory_floor(folder, LoadOptions(dtype="bfloat16", **cpu)),
        "torch int4": TorchBackend.memory_floor(folder, LoadOptions(precision="int4", **cpu)),
        "onnx int4, not exported": OnnxBackend.memory_floor(folder, LoadOptions(precision="int4", **cpu)),
    }
    said = {name: (floor.params, floor.bytes, floor.held_as) for name, floor in floors.items()}
    assert said == {
        "torch float32": (params, 4 * params, "float32"),
        "torch bfloat16": (params, 2 * params, "bfloat16"),
        "torch int4": (params, 4 * params, "float32"),
        "onnx int4, not exported": (params, 4 * params, "float32"),
    }
    assert TorchBackend.memory_floor(folder, LoadOptions(device="cuda")) is None  # the GPU's memory is not RAM
    monkeypatch.setattr("gptcli.runtime.loadable_memory_bytes", lambda: 4 * params - 1)
    with pytest.raises(MemoryShortError, match=f"^tiny-llama's {params:,} parameters need at least"):
        check_memory(TorchBackend, folder, LoadOptions(dtype="float32", **cpu))
    check_memory(TorchBackend, folder, LoadOptions(dtype="bfloat16", **cpu))  # half of it fits
    monkeypatch.setattr("gptcli.runtime.loadable_memory_bytes", lambda: None)  # unknown: no check
    check_memory(TorchBackend, folder, LoadOptions(dtype="float32", **cpu))


@pytest.mark.parametrize(
    ("backend", "target", "failure"),
    [
        ("torch", "gptcli.backends.torch_lean.build", RuntimeError("DefaultCPUAllocator: can't allocate memory")),
        ("onnx", "onnxruntime.InferenceSession", RuntimeError("RUNTIME_EXCEPTION : std::bad_alloc")),
        ("onnx", "gptcli.backends.onnx_backend.KvPool", OSError(12, "Cannot allocate memory")),  # its pages (QA)
    ],
)
def test_memory_running_out_in_a_load_is_out_of_memory_not_a_damaged_model(
    tiny_models, monkeypatch, capsys, backend, target, failure
):
    """QA: under `ulimit -v` a load that ran out of memory was "cannot load model" (exit 5) and, for an export,
    "delete the export folder and export again": a good model blamed, and its export thrown away."""
    import io

    from gptcli.cli.app import run

    def fails(*args, **kwargs):
        raise failure

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # generate reads a piped stdin first
    args = ["generate", "hi", "-n", "1", "-m", str(tiny_models["llama"]), "-b", backend, "--dtype", "float32"]
    if backend == "onnx":
        assert run([*args, "--precision", "fp32"]) == 0  # exported first, while there is memory
    capsys.readouterr()
    monkeypatch.setattr(target, fails)
    assert run([*args, *(["--precision", "fp32"] if backend == "onnx" else [])]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: out of memory loading ") and "export" not in err[1], err
    assert err[1] == (
        "hint: free some memory, or use a smaller model or precision (--precision int8/int4); a `ulimit -v` counts too"
    )


def test_an_error_reported_with_no_memory_left_for_rich_goes_out_plain(monkeypatch, capfd):
    """QA: under a tight `ulimit -v` the error's own printing raised MemoryError (Rich imports as it prints): an
    80-line traceback instead of the error."""
    from gptcli.cli import render
    from gptcli.errors import GptcliError

    def no_memory():
        raise MemoryError

    monkeypatch.setattr(render, "_error_console", no_memory)
    render.report(GptcliError("out of memory", hint="free some"))
    assert capfd.readouterr().err == "error: out of memory\nhint: free some\n"
