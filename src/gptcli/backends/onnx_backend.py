"""The ONNX Runtime backend: a cached, fused export driven with IO binding and in-place KV buffers.

Nothing on this path imports torch or transformers: onnxruntime and numpy run the model (the one-time
export in gptcli.export builds the graph from the safetensors weights). The KV cache lives in one pool
per backend (`KvPool`: per layer a key and a value block ``[slots, kv_heads, context, head_dim]``); a
cache is a slot and a length. The same memory is bound as ``past_key_values.{i}.*`` and
``present.{i}.*``, so attention appends the new positions in place and nothing is copied between steps.
`step` runs every one-token (decode) entry of a batch as ONE session call over a contiguous run of
slots, each row attending over its own length (GroupQueryAttention takes per-row lengths from the
attention mask); prefill chunks run one by one on their own slot. `forward` is a batch of one. On CUDA
the pool lives on the GPU: only the token ids go in and the last-position logits come out per step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gptcli.backends.base import Cache, LoadOptions, ModelInfo
from gptcli.backends.load_memory import MemoryFloor, may_load_on_gpu, safetensors_floor
from gptcli.backends.onnx_kvpool import KvPool
from gptcli.coercion import env_switch
from gptcli.errors import (
    BackendError,
    InputError,
    ModelError,
    allocation_failed,
    debug_enabled,
    out_of_memory,
)
from gptcli.export.graph import LOGITS_TO_KEEP
from gptcli.export.sidecar import MODEL_FILE, Export
from gptcli.hardware import CUDA_PROVIDER, ONNXRUNTIME, cuda_unusable_reason, resolve_device

CPU_PROVIDER = "CPUExecutionProvider"
# ORT's idle pool threads spin between nodes by default: the fastest on an idle machine (decode,
# default model, 2 threads: fp32 55.5 vs 47.8 tok/s, int8 130 vs 123). On a busy or shared CPU the
# spinning threads steal the cores the next node needs; GPTCLI_ORT_SPIN=0 makes them sleep.
SPIN_ENV = "GPTCLI_ORT_SPIN"


def spin_from_env() -> bool:
    """GPTCLI_ORT_SPIN (unset or empty: on; anything but 1/0, true/false, yes/no, on/off is exit 3)."""
    return env_switch(SPIN_ENV)


@dataclass(eq=False)
class OnnxCache:
    """A slot of the backend's KV pool and how many positions of it hold real data (-1: released)."""

    slot: int
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
        self.pool = KvPool(2 * self.layers, self.kv_heads, info.context_length, self.head_dim, self.kv_dtype, device)
        self._bindings: dict[tuple[int, int], Any] = {}  # (first slot, rows) -> IOBinding with the KV bound
        self._bindings_generation = self.pool.generation
        # Exports before graph version 10 have no `logits_to_keep` input (an export folder loaded as is).
        self._keeps_logits = LOGITS_TO_KEEP in {arg.name for arg in session.get_inputs()}

    # ------------------------------------------------------------------ availability and loading

    @classmethod
    def unavailable_reason(cls, device: str = "auto") -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
        if device == "cuda":
            reason = cuda_unusable_reason(ONNXRUNTIME)
            return f"CUDA requested but {reason}" if reason else None
        return None

    @property
    def weights_bytes(self) -> int:
        """The graph's files as exported (what `bench`'s size column shows, as llama-bench shows a GGUF's): an
        int4 export keeps some matrices at 8 bits (a large tied head), which params x 4 bits would not say."""
        files = self.meta["files"]
        return sum(int(files[name]) for name in (MODEL_FILE, MODEL_FILE + ".data") if name in files)

    @property
    def precision(self) -> str:
        """The loaded export's precision (an export folder's own, whatever --precision asked for)."""
        return self.info.dtype

    @classmethod
    def auto_choices(cls) -> dict[str, Any]:
        """The MatMulNBits compute type int8/int4 exports use on this CPU, and the int4 kernel (for `gptcli backends
        --json`)."""
        from gptcli.backends.int4_native import onnx_op_choice
        from gptcli.export.nbits_choice import cached_choice

        int4 = onnx_op_choice()
        kernel = {"int4_kernel": int4["kernel"], "int4_kernel_reason": int4["reason"]}
        choice = cached_choice()
        if choice is None:
            return {
                "matmulnbits_accuracy_level": None,
                "reason": "measured at this machine's first int8/int4 export",
                **kernel,
            }
        return {
            "matmulnbits_accuracy_level": {f"int{bits}": level for bits, level in choice.levels.items()},
            "reason": choice.reason,
            "timings_ms": choice.timings_ms,
            **kernel,
        }

    @classmethod
    def memory_floor(cls, folder: Path, options: LoadOptions) -> MemoryFloor | None:
        """The weights as the load holds them (backends/load_memory.py): an export not made yet reads every one
        as float32 first; a made one is read at its precision. None for an export folder (ORT's own files)."""
        from gptcli.export import SIDECAR_FILE
        from gptcli.export.cache import cached_export_dir

        precision = options.precision or "fp32"
        if precision == "fp16" or (folder / SIDECAR_FILE).is_file() or may_load_on_gpu(options.device):
            return None
        from gptcli.backends.int4_native import onnx_op_expected

        native = onnx_op_expected(precision, "cpu", folder)  # the export the load will look for
        if (cached_export_dir(folder, precision, "cpu", native) / SIDECAR_FILE).is_file():
            return safetensors_floor(folder, precision, "pick a smaller --precision (int8, int4), or free memory")
        hint = "its export reads the weights as float32 once: make it (`gptcli export`) on a machine with the room"
        return safetensors_floor(folder, "float32", hint)

    @classmethod
    def load(cls, folder: Path, options: LoadOptions) -> OnnxBackend:
        from gptcli.backends.int4_native import operators_of
        from gptcli.export import SIDECAR_FILE, read_export

        notify = options.extra.get("notify") or _stderr
        device = resolve_device(options.device, ONNXRUNTIME)
        precision = options.precision or "fp32"
        spin = options.extra.get("ort_spinning")
        if spin is None:
            spin = spin_from_env()
        if precision == "fp16" and device == "cpu":
            raise BackendError(
                "fp16 ONNX models run on CUDA only", hint="use --precision fp32, int8 or int4 on the CPU"
            )
        library = None  # gptcli's int4 operator, where the cache's export uses it
        if (folder / SIDECAR_FILE).is_file():  # an export folder made with `gptcli export --output`
            export = read_export(folder)
            if export.meta["device"] == "cuda" and device == "cpu":
                raise BackendError(f"{folder} was exported for CUDA", hint="export it again with --device cpu")
            device = export.meta["device"]
            made = export.meta["precision"]
            if precision not in ("fp32", made):  # fp32 is also the default: a folder's own precision goes unsaid
                notify(
                    f"warning: {folder} is an {made} export, so --precision {precision} does not apply"
                    f" (`gptcli export --precision {precision}` makes one)"
                )
        else:
            if device == "cuda" and options.device == "auto" and precision != "fp16":
                device = _cpu_for_what_cuda_cannot(folder, notify)
            export, library = _cached_export(folder, precision, device, notify)
        try:
            session = cls._session(export.model_path, device, options.threads, spin, operators_of(export, library))
        except BackendError:
            if options.device != "auto" or precision == "fp16" or export.folder == folder:
                raise
            notify("warning: CUDA is not usable; running the ONNX model on the CPU")
            device = "cpu"
            export, library = _cached_export(folder, precision, device, notify)
            session = cls._session(export.model_path, device, options.threads, spin, operators_of(export, library))
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
            kv_bytes_per_token=_kv_bytes_per_token(model, meta["io"]["kv_dtype"]),
        )
        try:
            return cls(session, info, meta, device)
        except (OSError, MemoryError) as exc:  # the KV pool's pages (ENOMEM under `ulimit -v`)
            if allocation_failed(exc):
                raise out_of_memory(f"loading {export.model_path}") from None
            raise

    @staticmethod
    def _session(path: Path, device: str, threads: int | None, spin: bool = True, operators: Path | None = None) -> Any:
        import onnxruntime as ort

        # Fatal only: what fails is raised and said in gptcli's own words ("std::bad_alloc" came twice, once as a
        # red log line); GPTCLI_DEBUG=1 shows ORT's errors too. Also for provider loading outside the session.
        severity = 3 if debug_enabled() else 4
        ort.set_default_logger_severity(severity)
        opts = ort.SessionOptions()
        opts.log_severity_level = severity
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if operators is not None:  # gptcli's Int4MatMul (export.native_ops), on the session's own threads
            opts.register_custom_ops_library(str(operators))
        if device == "cuda" and hasattr(ort, "preload_dlls") and importlib.util.find_spec("nvidia") is not None:
            with contextlib.redirect_stdout(sys.stderr):  # it reports what it cannot load on stdout
                ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels (pip install "gptcli[gpu]")
        providers = [(CUDA_PROVIDER, {"device_id": 0}), CPU_PROVIDER] if device == "cuda" else [CPU_PROVIDER]
        try:
            session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for a bad graph
            message = str(exc).splitlines()[0][:300]
            if allocation_failed(exc):  # a good export: no hint to delete it
                raise out_of_memory(f"loading {path}") from None
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
        cache = OnnxCache(slot=-1, capacity=self.info.context_length)
        self.pool.acquire(cache)
        return cache

    def release(self, cache: OnnxCache) -> None:
        """Give the cache's slot back to the pool (a dropped cache is given back when it is collected)."""
        self.pool.release(cache)

    def fork(self, cache: OnnxCache, length: int) -> OnnxCache:
        """A new cache (slot) holding a copy of the first `length` positions of `cache`."""
        copy = self.new_cache()  # may grow the pool: slots keep their numbers
        length = min(length, cache.length)
        self.pool.copy_prefix(cache, copy, length)
        copy.length = length
        return copy

    def forward(self, ids: Sequence[int], cache: OnnxCache) -> tuple[np.ndarray, OnnxCache]:
        logits, (cache,) = self.step([(ids, cache)])
        return logits[0], cache

    def step(self, batch: Sequence[tuple[Sequence[int], Cache]]) -> tuple[np.ndarray, list[OnnxCache]]:
        """Advance every entry; all one-token entries share one session call, prefill chunks run alone."""
        caches: list[OnnxCache] = [cache for _, cache in batch]  # type: ignore[misc]
        self._check(batch, caches)
        logits = np.empty((len(batch), self.info.vocab_size), dtype=np.float32)
        decode = [row for row, (ids, _) in enumerate(batch) if len(ids) == 1]
        if decode:
            start = self.pool.arrange([caches[row] for row in decode])
            decode.sort(key=lambda row: caches[row].slot)
            rows = self._run([batch[row][0] for row in decode], [caches[row] for row in decode], start)
            logits[decode] = rows[:, 0]
        for row, (ids, cache) in enumerate(batch):
            if len(ids) > 1:
                logits[row] = self._run([ids], [cache], cache.slot)[0, 0]
        return logits, caches

    def score(self, ids: Sequence[int], cache: OnnxCache) -> tuple[np.ndarray, OnnxCache]:
        """Float32 logits [len(ids), vocab] of every position of `ids` in one session call (perplexity);
        the cache grows by len(ids). An export made before the graph had `logits_to_keep` runs token by token."""
        self._check([(ids, cache)], [cache])
        if not self._keeps_logits:
            return np.stack([self.forward([token], cache)[0] for token in ids]), cache
        return self._run([ids], [cache], cache.slot, keep=len(ids))[0], cache

    def truncate(self, cache: OnnxCache, length: int) -> OnnxCache:
        # Positions past `length` stay in the buffer but are never read again: the mask length says so.
        cache.length = max(0, min(length, cache.length))
        return cache

    # ------------------------------------------------------------------ running the graph

    def _check(self, batch: Sequence[tuple[Sequence[int], Cache]], caches: list[OnnxCache]) -> None:
        if not batch:
            raise ValueError("step() needs at least one sequence")
        if len({id(cache) for cache in caches}) != len(caches):
            raise ValueError("step() got the same cache twice")
        for (ids, _), cache in zip(batch, caches, strict=True):
            if len(ids) == 0:
                raise ValueError("forward() needs at least one token")
            if cache.slot < 0:
                raise ValueError("this cache was released; make a new one with new_cache()")
            total = cache.length + len(ids)
            if total > cache.capacity:
                raise InputError(
                    f"{total} tokens do not fit the model's context of {cache.capacity}",
                    hint="shorten the prompt or lower --max-tokens",
                )

    def _run(self, ids: list[Sequence[int]], caches: list[OnnxCache], start: int, *, keep: int = 1) -> np.ndarray:
        """One session call over slots [start, start + len(caches)): every row has len(ids[0]) new tokens.

        Returns the logits [rows, keep, vocab] of each row's last `keep` positions."""
        count, new = len(caches), len(ids[0])
        binding = self._binding(start, count)
        input_ids = np.asarray(ids, dtype=np.int64).reshape(count, new)
        if count == 1:
            first = caches[0].length
            mask = self._ones[:, : first + new]
            positions = self._positions[:, first : first + new]
        else:  # decode rows: each attends over its own length (the mask's row sums), the width is the longest
            lengths = np.array([cache.length for cache in caches], dtype=np.int64)
            positions = lengths[:, None]
            mask = (self._positions[:, : int(lengths.max()) + 1] <= lengths[:, None]).astype(np.int64)
        out = np.empty((count, keep, self.info.vocab_size), dtype=np.float32)
        if self._keeps_logits:  # bound every call: the binding is shared with calls that keep one position
            binding.bind_cpu_input(LOGITS_TO_KEEP, np.array([keep], dtype=np.int64))
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        binding.bind_output("logits", "cpu", 0, np.float32, out.shape, out.ctypes.data)
        self.session.run_with_iobinding(binding)
        for cache in caches:
            cache.length += new
        return out

    def _binding(self, start: int, count: int) -> Any:
        """An IOBinding with slots [start, start + count) of every layer bound as past and present."""
        if self._bindings_generation != self.pool.generation or len(self._bindings) > 256:
            self._bindings.clear()  # the pool was reallocated: old bindings point into freed memory
            self._bindings_generation = self.pool.generation
        binding = self._bindings.get((start, count))
        if binding is None:
            binding = self.session.io_binding()
            shape = [count, self.kv_heads, self.info.context_length, self.head_dim]
            for layer in range(self.layers):
                for index, kind in enumerate(("key", "value")):
                    pointer = self.pool.pointer(2 * layer + index, start)
                    binding.bind_input(f"past_key_values.{layer}.{kind}", self.device, 0, self.kv_dtype, shape, pointer)
                    binding.bind_output(f"present.{layer}.{kind}", self.device, 0, self.kv_dtype, shape, pointer)
            self._bindings[(start, count)] = binding
        return binding


def _cached_export(folder: Path, precision: str, device: str, notify: Any) -> tuple[Export, Path | None]:
    """The cache's export for this load, and the library of gptcli's Int4MatMul where an int4 CPU export uses it."""
    from gptcli.backends.int4_native import onnx_op_for
    from gptcli.export import ensure_export

    library = onnx_op_for(precision, device, folder, notify)
    native = library is not None
    return ensure_export(folder, precision=precision, device=device, notify=notify, native_int4=native), library


def _cpu_for_what_cuda_cannot(folder: Path, notify: Any) -> str:
    """For --device auto: the CPU (with a warning) for a model the float16 CUDA graph cannot run, else CUDA."""
    from gptcli.export import cuda_refusal
    from gptcli.hf import read_architecture

    reason = cuda_refusal(read_architecture(folder))
    if reason is None:
        return "cuda"
    notify(f"warning: {reason}; running the ONNX model on the CPU")
    return "cpu"


def _kv_bytes_per_token(model: dict[str, Any], kv_dtype: str) -> int:
    """Key and value of every layer for one position."""
    itemsize = 2 if kv_dtype == "float16" else 4
    return 2 * int(model["num_layers"]) * int(model["num_kv_heads"]) * int(model["head_dim"]) * itemsize
