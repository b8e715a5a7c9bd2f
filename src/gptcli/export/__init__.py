"""Export a Hugging Face model folder to an ONNX Runtime graph with a KV cache, once, into a cache.

The graph is built directly from the safetensors weights with the ONNX helper API, the way
onnxruntime-genai's model builder does it, so it comes out already fused: one GroupQueryAttention
per layer (packed QKV projection, rotary inside the op for Llama), SkipSimplifiedLayerNormalization /
SkipLayerNormalization for the residual adds, packed gate-up MatMul, logits for the last position only
(unless the ``logits_to_keep`` input asks for more: scoring a text).
That is ~10 nodes per layer instead of the ~75 of a traced export, which is what makes decoding fast.

I/O follows the Hugging Face names: ``input_ids``, ``attention_mask``, ``position_ids``, ``logits_to_keep``,
``past_key_values.{i}.key|value`` → ``logits``, ``present.{i}.key|value``, caches in BNSH layout
``[batch, kv_heads, length, head_dim]``. When a past buffer and its present output are the same
tensor (IO binding), attention writes the new keys in place: the backend relies on that.

int8/int4 are weight-only block quantization (MatMulNBits, block 32, asymmetric, the accuracy level
measured per CPU by nbits_choice), applied to every MatMul including the (untied) lm_head, and on the
CPU to the token embedding's Gather (GatherBlockQuantized, 8 bits); int4 keeps the lm_head at 8 bits,
keeps weights that are already 4-bit (a Q4_1 GGUF source) on their own grid instead of rounding them
twice, and keeps at 8 bits weights already on a finer grid (the 5- to 8-bit tensors of a Q4_K_M GGUF).
An 8-bit weight already on an 8-bit grid (a GGUF's Q8_0) is stored exactly.

Exports are cached under ``cache_dir()/onnx/`` keyed by the source fingerprint, precision, device,
opset and versions, and published atomically (temp folder + rename) with a sidecar JSON.

The modules: graph (the builder, shared pieces), decoder (the I/O contract, one graph per family), llama (the
body of every llama-like family: Llama, Qwen2/3, Mistral, Gemma 3, Phi-3) and gpt2, quantize (MatMulNBits),
nbits_choice (which compute type is fastest on this CPU), cache (keys and stale exports), sidecar
(the record and its reader).
"""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gptcli import __version__
from gptcli.atomicio import apply_umask, disk_full, publish_dir, temp_dir_beside
from gptcli.errors import InputError, ModelError, UsageError
from gptcli.export import graph
from gptcli.export.cache import (
    cache_key,
    cached_export_dir,
    content_hash,
    ort_version,
    remove_stale_exports,
    source_fingerprint,
)
from gptcli.export.decoder import build_graph
from gptcli.export.graph import GRAPH_VERSION, MS_OPSET, OPSET, GraphBuilder, compute_dtype
from gptcli.export.native_ops import INT4_OP
from gptcli.export.nbits_choice import choose_levels
from gptcli.export.quantize import (
    GRID_TOLERANCE,
    INT4_KEEP_8BIT,
    QUANT_ACCURACY_LEVEL,
    QUANT_BLOCK,
    apply_accuracy_levels,
    eight_bit_blocks,
    fine_grid_kept,
    grid_of,
    on_grid,
    pack_codes,
    quantize,
    quantize_blocks,
    quantize_embedding,
)
from gptcli.export.sidecar import MODEL_FILE, SIDECAR_FILE, Export, io_record, model_record, read_export, write_sidecar
from gptcli.hf import FAMILIES, FAST_PATH_FAMILIES, Architecture, read_architecture, weight_files
from gptcli.models import MODEL_SIDE_FILES
from gptcli.paths import check_utf8_path

__all__ = [
    "DEVICES", "GRAPH_VERSION", "GRID_TOLERANCE", "INT4_KEEP_8BIT", "MODEL_FILE", "MS_OPSET", "OPSET", "PRECISIONS",
    "QUANT_ACCURACY_LEVEL", "QUANT_BLOCK", "SIDECAR_FILE", "Export", "GraphBuilder", "build_export", "build_graph",
    "cache_key", "cached_export_dir", "check_choice", "check_exportable", "compute_dtype", "content_hash",
    "cuda_refusal", "eight_bit_blocks", "ensure_export", "grid_of", "load_weights", "on_grid", "ort_version",
    "pack_codes", "quantize", "quantize_blocks", "read_export", "source_fingerprint",
]  # fmt: skip

Notify = Callable[[str], None]

PRECISIONS = ("fp32", "fp16", "int8", "int4")
DEVICES = ("cpu", "cuda")


def _noop(_: str) -> None:
    pass


def check_choice(precision: str, device: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'", hint=f"choose one of: {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise UsageError(f"unknown export device '{device}'", hint="choose cpu or cuda")
    if precision == "fp16" and device == "cpu":
        raise UsageError("fp16 exports are for CUDA", hint="use --precision fp32, int8 or int4 on the CPU")


def cuda_refusal(arch: Architecture) -> str | None:
    """Why a model cannot run in the CUDA graph, which computes in float16; None when it can."""
    if arch.family == "gemma3":  # Gemma 3 270M's residual stream reaches 1e5 (float16 ends at 65504)
        return "Gemma 3's activations outgrow float16, in which the CUDA graph computes"
    return None


def check_exportable(arch: Architecture, device: str = "cpu") -> None:
    """A ModelError (with the torch backend as the hint) for a model the fused graph cannot express exactly."""
    hint = "use --backend torch for this model"
    refusal = cuda_refusal(arch) if device == "cuda" else None
    if refusal:
        raise ModelError(
            f"cannot export {arch.architecture} to ONNX for CUDA: {refusal}",
            hint="export it for the CPU (--device cpu), or use --backend torch on the GPU",
        )
    if arch.family not in FAST_PATH_FAMILIES["onnx"]:
        supported = ", ".join(sorted(a for a, family in FAMILIES.items() if family in FAST_PATH_FAMILIES["onnx"]))
        raise ModelError(
            f"cannot export {arch.architecture} to ONNX: supported architectures are {supported}", hint=hint
        )
    refusal = arch.fast_path_refusal("onnx")
    if refusal:
        raise ModelError(f"cannot export {arch.architecture} to ONNX: {refusal}", hint=hint)


def ensure_export(
    folder: Path,
    *,
    precision: str = "fp32",
    device: str = "cpu",
    output: Path | None = None,
    force: bool = False,
    notify: Notify = _noop,
    native_int4: bool = False,
) -> Export:
    """Return the cached export of `folder`, building it first when missing (progress through notify).
    `native_int4`: an int4 CPU export in the cache uses gptcli's Int4MatMul operator (the onnx backend has its
    kernel); an `output` folder is for any ONNX Runtime, so it keeps MatMulNBits."""
    check_choice(precision, device)
    native_int4 = native_int4 and precision == "int4" and device == "cpu" and output is None
    if (folder / SIDECAR_FILE).is_file():  # it has no weights to build from: "weight ... is missing" misled
        raise ModelError(
            f"{folder} is already an ONNX export",
            hint="run it with --backend onnx, or export the model it was made from (`gptcli models info` names it)",
        )
    # Before the cache too: an export made before a rule refused its model must not run (and fail in ORT).
    check_exportable(read_architecture(folder), device)
    dest = output if output is not None else cached_export_dir(folder, precision, device, native_int4)
    if output is not None:  # the cache's own folder is checked where it is named (paths.cache_dir)
        check_utf8_path(output, "ONNX takes", hint="choose a folder whose name is UTF-8")
    if not force and (dest / SIDECAR_FILE).is_file():
        try:
            existing = read_export(dest)
        except ModelError as exc:  # its hint, "export again (`gptcli export`)", met this same check again
            again = ["gptcli", "export", str(folder), "--precision", precision, "--device", device]
            again += ["--output", str(output)] if output is not None else []
            raise ModelError(exc.message, hint=f"`{shlex.join([*again, '--force'])}` exports it again") from None
        if output is None or existing.meta.get("cache_key") == cache_key(folder, precision, device, native_int4):
            return existing
    if output is not None and output.exists() and any(output.iterdir()) and not (output / SIDECAR_FILE).is_file():
        raise InputError(f"{output} exists and is not a gptcli ONNX export", hint="choose an empty or new folder")
    where = f"into {dest}" if output is not None else f"once, cached in {dest}"
    notify(f"exporting {folder.name} to ONNX ({precision}, {device}) {where}")
    if device == "cuda" and precision in {"fp32", "int8", "int4"}:
        notify("on CUDA the graph computes in float16 (weights stay at the chosen precision)")
    started = time.perf_counter()
    tmp = temp_dir_beside(dest)
    try:
        meta = build_export(folder, tmp, precision=precision, device=device, notify=notify, native_int4=native_int4)
        # An old export at dest is replaced as a whole, when asked to (--force, or an --output of another
        # model); in the cache, one at dest now is a concurrent export's: kept, not swapped under its readers.
        publish_dir(tmp, dest, replace=force or output is not None)
    except OSError as exc:
        if (full := disk_full(exc, dest)) is not None:  # named by the export, not by a source file copied into it
            raise full from None
        if not exc.filename:  # an error inside onnx's writer names no file: the error names the export
            exc.filename = str(dest)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if output is None:
        remove_stale_exports(dest, folder)
    notify(f"exported in {time.perf_counter() - started:.1f} s")
    return Export(dest, meta)


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors model as float32 numpy arrays (bf16 goes through torch)."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="numpy") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name] = handle.get_tensor(name).astype(np.float32, copy=False)
        except (TypeError, ValueError):  # bfloat16 has no numpy dtype
            import torch
            from safetensors.torch import load_file

            for name, tensor in load_file(str(file)).items():
                tensors[name] = tensor.to(torch.float32).numpy()
    return tensors


def build_export(
    folder: Path, out: Path, *, precision: str, device: str, notify: Notify = _noop, native_int4: bool = False
) -> dict[str, Any]:
    """Build, optionally quantize, and save the graph plus its sidecar into `out` (an empty folder)."""
    import onnx

    arch = read_architecture(folder)  # checked against the safetensors headers before any weight is read
    check_exportable(arch, device)
    notify(f"building the {arch.family} graph ({arch.layers} layers) from {folder.name}")
    weights = load_weights(folder)
    try:
        model = build_graph(arch, weights, precision=precision, device=device)
    except KeyError as exc:
        raise ModelError(f"{folder}: weight {exc} is missing for a {arch.architecture}") from None
    del weights
    levels, embedding = None, []
    if precision in {"int8", "int4"}:
        notify(f"quantizing weights to {precision} (block {QUANT_BLOCK})")
        model = quantize(model, precision, native_int4=native_int4)
        if device == "cpu":
            embedding = quantize_embedding(model)
            levels = choose_levels(
                (8,) if precision == "int8" else (4, 8),
                arch.hidden,
                on_measure=lambda: notify(
                    "choosing the MatMulNBits compute type for this CPU (timed once, then cached)"
                ),
            )
            apply_accuracy_levels(model, levels.levels)
    onnx.save_model(
        model,
        str(out / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=MODEL_FILE + ".data",
        size_threshold=1024,
    )
    for name in MODEL_SIDE_FILES:  # the tokenizer and configs: the folder alone is a model for --backend onnx
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
    apply_umask(out)  # onnx writes the weights 0600; copy2 keeps the source's mode (0600 in a converted model before)
    quantization = {
        "method": "MatMulNBits",
        "bits": 8 if precision == "int8" else 4,
        "block_size": QUANT_BLOCK,
        "symmetric": False,
        "accuracy_level": {str(bits): (levels.level(bits) if levels else QUANT_ACCURACY_LEVEL) for bits in (4, 8)},
        "accuracy_level_choice": levels.as_dict() if levels else None,
        "kept_at_8_bits": [] if precision == "int8" else list(INT4_KEEP_8BIT),
        "embedding_8_bit_gathers": embedding,
        "finer_source_kept_at_8_bits": [] if precision == "int8" else fine_grid_kept(model),
        "grid_kept_matmuls": sum(n.input[0].endswith("/with_block_sums") for n in model.graph.node),
        "int4_op_matmuls": sum(n.op_type == INT4_OP for n in model.graph.node),
        "int4_op_8bit_matmuls": sum(
            n.op_type == INT4_OP and any(a.name == "bits" and a.i == 8 for a in n.attribute) for n in model.graph.node
        ),
    }
    quantization["int4_kernel"] = INT4_OP if quantization["int4_op_matmuls"] else "MatMulNBits"
    meta = {
        "format": "gptcli-onnx",
        "graph_version": graph.GRAPH_VERSION,
        "source": {
            "path": str(folder.resolve()),
            "name": folder.name,
            "sha256": content_hash(folder),
            "fingerprint": source_fingerprint(folder),
        },
        "cache_key": cache_key(folder, precision, device, native_int4),
        "precision": precision,
        "device": device,
        "opset": OPSET,
        "onnxruntime_version": ort_version(),
        "gptcli_version": __version__,
        "io": io_record(arch, compute_dtype(precision, device)),
        "model": model_record(arch, folder),
        "quantization": quantization if precision in {"int8", "int4"} else None,
    }
    return write_sidecar(out, meta)
