"""The ONNX Runtime backend: a cached, fused export driven with IO binding and in-place KV buffers.

Nothing on this path imports torch or transformers: onnxruntime and numpy run the model (the one-time
export in gptcli.export builds the graph from the safetensors weights). Each cache owns one
preallocated key and value buffer per layer, ``[1, kv_heads, context, head_dim]``; the same buffer is
bound as ``past_key_values.{i}.*`` and ``present.{i}.*``, so attention appends the new positions in
place and nothing is copied between steps. On CUDA the buffers live on the GPU: only the token ids go
in and the last-position logits come out per step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gptcli.backends.base import LoadOptions, ModelInfo
from gptcli.errors import BackendError, InputError, ModelError
from gptcli.hardware import CUDA_PROVIDER, ONNXRUNTIME, cuda_unusable_reason, resolve_device

CPU_PROVIDER = "CPUExecutionProvider"
# ORT's idle pool threads spin between nodes by default: the fastest on an idle machine (decode,
# default model, 2 threads: fp32 55.5 vs 47.8 tok/s, int8 130 vs 123). On a busy or shared CPU the
# spinning threads steal the cores the next node needs; GPTCLI_ORT_SPIN=0 makes them sleep.
SPIN_ENV = "GPTCLI_ORT_SPIN"


@dataclass
class OnnxCache:
    """Per-layer KV buffers bound to an IOBinding, and how many positions hold real data."""

    binding: Any
    buffers: list[Any] = field(repr=False)
    capacity: int
    length: int = 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class OnnxBackend:
    """An exported decoder graph on ONNX Runtime (CPU or CUDA execution provider)."""

    name: ClassVar[str] = "onnx"

    def __init__(self, session: Any, info: ModelInfo, meta: dict[str, Any], device: str) -> None:
        self.session = session
        self.info = info
        self.meta = meta
        self.device = device
        model = meta["model"]
        self.layers = int(model["num_layers"])
        self.kv_heads = int(model["num_kv_heads"])
        self.head_dim = int(model["head_dim"])
        self.kv_dtype = np.float16 if meta["io"]["kv_dtype"] == "float16" else np.float32
        self._ones = np.ones((1, info.context_length), dtype=np.int64)
        self._positions = np.arange(info.context_length, dtype=np.int64)[None, :]

    # ------------------------------------------------------------------ availability and loading

    @classmethod
    def unavailable_reason(cls, device: str = "auto") -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
        if device == "cuda":
            reason = cuda_unusable_reason(ONNXRUNTIME)
            return f"CUDA requested but {reason}" if reason else None
        return None

    @classmethod
    def load(cls, folder: Path, options: LoadOptions) -> OnnxBackend:
        from gptcli.export import SIDECAR_FILE, ensure_export, read_export

        notify = options.extra.get("notify") or _stderr
        device = resolve_device(options.device, ONNXRUNTIME)
        precision = options.precision or "fp32"
        spin = options.extra.get("ort_spinning")
        if spin is None:
            spin = os.environ.get(SPIN_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}
        if precision == "fp16" and device == "cpu":
            raise BackendError(
                "fp16 ONNX models run on CUDA only", hint="use --precision fp32, int8 or int4 on the CPU"
            )
        if (folder / SIDECAR_FILE).is_file():  # an export folder made with `gptcli export --output`
            export = read_export(folder)
            if export.meta["device"] == "cuda" and device == "cpu":
                raise BackendError(f"{folder} was exported for CUDA", hint="export it again with --device cpu")
            device = export.meta["device"]
        else:
            export = ensure_export(folder, precision=precision, device=device, notify=notify)
        try:
            session = cls._session(export.model_path, device, options.threads, spin)
        except BackendError:
            if options.device != "auto" or precision == "fp16" or export.folder == folder:
                raise
            notify("warning: CUDA is not usable; running the ONNX model on the CPU")
            device = "cpu"
            export = ensure_export(folder, precision=precision, device=device, notify=notify)
            session = cls._session(export.model_path, device, options.threads, spin)
        meta = export.meta
        model = meta["model"]
        info = ModelInfo(
            name=meta["source"]["name"],
            architecture=model["architecture"],
            context_length=int(model["context_length"]),
            vocab_size=int(model["vocab_size"]),
            num_layers=int(model["num_layers"]),
            params=int(model["params"]),
            dtype=meta["precision"],
            device=device,
        )
        return cls(session, info, meta, device)

    @staticmethod
    def _session(path: Path, device: str, threads: int | None, spin: bool = True) -> Any:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # errors only, also from provider loading outside the session
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if device == "cuda" and hasattr(ort, "preload_dlls") and importlib.util.find_spec("nvidia") is not None:
            with contextlib.redirect_stdout(sys.stderr):  # it reports what it cannot load on stdout
                ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels (pip install "gptcli[gpu]")
        providers = [(CUDA_PROVIDER, {"device_id": 0}), CPU_PROVIDER] if device == "cuda" else [CPU_PROVIDER]
        try:
            session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for a bad graph
            message = str(exc).splitlines()[0][:300]
            if "CUDA" in message or "cuda" in message:
                raise BackendError(f"CUDA execution provider failed: {message}") from None
            raise ModelError(
                f"cannot load ONNX model {path}: {message}",
                hint="delete the export folder and export again (`gptcli export --force`)",
            ) from None
        if device == "cuda" and CUDA_PROVIDER not in session.get_providers():
            raise BackendError("CUDA execution provider is not usable here (no GPU or driver?)")
        return session

    # ------------------------------------------------------------------ the protocol

    def new_cache(self) -> OnnxCache:
        import onnxruntime as ort

        shape = [1, self.kv_heads, self.info.context_length, self.head_dim]
        binding = self.session.io_binding()
        buffers = []
        for i in range(self.layers):
            for kind in ("key", "value"):
                if self.device == "cuda":
                    value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, "cuda", 0)
                else:
                    # np.zeros maps zero pages lazily: memory is committed only as positions fill.
                    value = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.kv_dtype))
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                binding.bind_ortvalue_output(f"present.{i}.{kind}", value)
                buffers.append(value)
        return OnnxCache(binding, buffers, self.info.context_length)

    def forward(self, ids: Sequence[int], cache: OnnxCache) -> tuple[np.ndarray, OnnxCache]:
        n = len(ids)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        start, total = cache.length, cache.length + n
        if total > cache.capacity:
            raise InputError(
                f"{total} tokens do not fit the model's context of {cache.capacity}",
                hint="shorten the prompt or lower --max-tokens",
            )
        binding = cache.binding
        input_ids = np.asarray(ids, dtype=np.int64).reshape(1, n)
        logits = np.empty((1, 1, self.info.vocab_size), dtype=np.float32)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", self._ones[:, :total])
        binding.bind_cpu_input("position_ids", self._positions[:, start:total])
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        cache.length = total
        return logits[0, 0], cache

    def truncate(self, cache: OnnxCache, length: int) -> OnnxCache:
        # Positions past `length` stay in the buffer but are never read again: the mask length says so.
        cache.length = max(0, min(length, cache.length))
        return cache
