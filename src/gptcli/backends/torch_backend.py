"""The PyTorch backend: a transformers causal LM driven step by step against an explicit KV cache.

Two engines sit behind it. For the families hf.FAMILIES names (Llama, GPT-2, Qwen2/3, Mistral, Gemma 3,
Phi-3) the lean engine (torch_lean.py) runs the same weights with fused, re-laid-out matrices and a
preallocated cache; anything else, or a setting the lean engine does not implement exactly (a rope type,
say: `Architecture.fast_path_refusal("lean")`), runs through transformers' own forward with a
DynamicCache, and `TorchBackend.fallback_reason` says why. `GPTCLI_TORCH_IMPL=hf` forces transformers'
engine; `GPTCLI_TORCH_IMPL=lean` makes a refusal an error instead of a fallback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gptcli.backends.base import LoadOptions, ModelInfo
from gptcli.backends.load_memory import MemoryFloor, may_load_on_gpu, safetensors_floor
from gptcli.errors import BackendError, ConfigError, ModelError, allocation_failed, clipped, out_of_memory
from gptcli.hardware import (
    TORCH,
    cpu_dtype,
    cuda_unusable_reason,
    default_threads,
    isa_summary,
    quiet_transformers,
    resolve_device,
    resolve_dtype,
    set_torch_threads,
)
from gptcli.hf import context_length, read_config, weight_files

IMPL_ENV = "GPTCLI_TORCH_IMPL"
IMPLS = ("auto", "hf", "lean")


def impl_from_env() -> str:
    """GPTCLI_TORCH_IMPL (unset or empty: auto); any other value than auto, hf or lean is an error, not silently
    auto (GPTCLI_TORCH_IMPL=HF ran the lean engine it meant to compare against)."""
    value = os.environ.get(IMPL_ENV, "").strip() or "auto"
    if value not in IMPLS:
        raise ConfigError(f"{IMPL_ENV} must be auto, hf or lean, got {clipped(repr(value))}", hint=f"unset {IMPL_ENV}")
    return value


@dataclass
class TorchCache:
    """An engine's cache (LeanCache or transformers' DynamicCache) plus the positions it holds."""

    kv: Any
    length: int = 0


class HFEngine:
    """transformers' own forward, one call per prefill or decode step."""

    def __init__(self, model: Any) -> None:
        import inspect

        self.model = model
        # transformers 5.x renamed `past_key_values` to `cache`; older releases only know the old name.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forward(self, ids: Sequence[int], kv: Any, start: int) -> Any:
        return self._run(ids, kv, start, keep=1)[0, -1].float()

    def _run(self, ids: Sequence[int], kv: Any, start: int, *, keep: int) -> Any:
        """transformers' logits [1, keep, vocab] of the last `keep` positions (0: all of them)."""
        import torch

        device = self.model.device
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
        positions = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=keep,
                **{self._cache_kw: kv},
            )
        return out.logits

    def step(self, batch: Sequence[tuple[Sequence[int], TorchCache]]) -> Any:
        """No native batching here: one forward per sequence (transformers' cache is per sequence)."""
        import torch

        return torch.stack([self.forward(ids, cache.kv, cache.length) for ids, cache in batch])

    def score(self, ids: Sequence[int], kv: Any, start: int) -> Any:
        """Logits [len(ids), vocab] of every position."""
        return self._run(ids, kv, start, keep=0)[0].float()

    def kv_bytes_per_token(self) -> int:
        config = self.model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return 2 * config.num_hidden_layers * kv_heads * head_dim * self.model.dtype.itemsize

    def truncate(self, kv: Any, length: int, current: int) -> None:
        kv.crop(length - current)  # negative: drop that many positions from the end

    def fork(self, kv: Any, length: int, current: int) -> Any:
        import copy

        forked = copy.deepcopy(kv)
        self.truncate(forked, length, current)
        return forked


class LeanEngine:
    """torch_lean's fused forward for the families it knows."""

    def __init__(self, lean: Any) -> None:
        self.lean = lean

    def new_cache(self) -> Any:
        return self.lean.new_cache()

    def step(self, batch: Sequence[tuple[Sequence[int], TorchCache]]) -> Any:
        """Native: all sequences' tokens through the dense layers together (torch_lean.LeanModel.step)."""
        return self.lean.step([(ids, cache.kv) for ids, cache in batch])

    def score(self, ids: Sequence[int], kv: Any, start: int) -> Any:
        return self.lean.score(ids, kv)

    def kv_bytes_per_token(self) -> int:
        return self.lean.kv_bytes_per_position()

    def truncate(self, kv: Any, length: int, current: int) -> None:
        kv.length = length  # positions past `length` are overwritten by the next forward

    def fork(self, kv: Any, length: int, current: int) -> Any:
        return self.lean.fork(kv, length)


def torch_lean_refusal(cfg: dict[str, Any], source: Path) -> tuple[str | None, bool]:
    """(why the lean engine cannot run this model exactly or None, whether its family is one the lean engine knows)."""
    from gptcli.backends import torch_lean

    arch = torch_lean.architecture_of(cfg, source)
    return torch_lean.refusal(arch), arch.family != "other"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_precision(precision: str, device: str) -> bool:
    """Whether --precision asks for quantized weights (CPU only: `--device auto` means the CPU then);
    an error for a precision torch cannot run, or one on `--device cuda`."""
    from gptcli.backends.lean_quant import PRECISIONS, bits_of

    if precision not in PRECISIONS:
        raise BackendError(
            f"the torch backend runs --precision {', '.join(PRECISIONS)}, not {precision}",
            hint="for 16-bit weights use --dtype bfloat16 or float16 (--precision fp16 is for onnx)",
        )
    quantized = bits_of(precision) is not None
    if quantized and device == "cuda":
        raise BackendError(
            f"--precision {precision} on torch runs on the CPU only", hint="add --device cpu, or use --backend onnx"
        )
    return quantized


def _avoid_cudnn_attention() -> None:
    """Decode without cuDNN's attention: it builds an execution plan for each new key length, that is every
    decode step. Measured on an H200 (a 135M Llama, 40 steps from 37 positions): 79 ms a step in float16
    with it, 17 ms without (bfloat16 99 vs 21); float32 never used it (24 ms either way)."""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)


class TorchBackend:
    """transformers AutoModelForCausalLM on CPU or CUDA; prefill once, then one token per step.

    `step` advances several sequences at once: natively on the lean engine, a loop on transformers'.
    """

    name: ClassVar[str] = "torch"
    # --precision on torch: fp32 runs the weights at --dtype; int8/int4 quantize them (lean engine, CPU).
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8", "int4")

    def __init__(self, engine: HFEngine | LeanEngine, info: ModelInfo, fallback_reason: str | None = None) -> None:
        self.engine = engine
        self.info = info
        # Why a model of a family the lean engine knows runs on transformers' engine instead (None: it does not).
        self.fallback_reason = fallback_reason
        self.weights_bytes: int | None = None  # the quantized weights' size (None: params × dtype size)

    @property
    def precision(self) -> str:
        """What the weights run at, as bench labels it: int8/int4 when quantized, else the dtype (fp32, bf16)."""
        dtype = self.info.dtype
        return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)

    @classmethod
    def unavailable_reason(cls, device: str = "auto") -> str | None:
        import importlib.util

        for package in ("torch", "transformers"):
            if importlib.util.find_spec(package) is None:
                return f"{package} is not installed"
        reason = cuda_unusable_reason(TORCH) if device == "cuda" else None
        return f"CUDA requested but {reason}" if reason else None

    @classmethod
    def memory_floor(cls, folder: Path, options: LoadOptions) -> MemoryFloor | None:
        """The weights at the load's dtype (backends/load_memory.py); quantized ones are made from float32 ones."""
        quantized = (options.precision or "fp32") != "fp32"
        if not quantized and may_load_on_gpu(options.device):
            return None
        dtype = cpu_dtype("float32" if quantized and options.dtype == "auto" else options.dtype).dtype
        if quantized:
            hint = "pick a smaller model (the quantized weights are made from float32 ones), or free memory"
        elif dtype == "float32":
            hint = "--dtype bfloat16 holds half (slower on a CPU without bf16), or pick a smaller model"
        else:
            hint = "pick a smaller model, or free memory"
        return safetensors_floor(folder, dtype, hint)

    @classmethod
    def auto_choices(cls) -> dict[str, Any]:
        """What `--dtype auto` picks on this CPU and why, the float32 one-row, int8 and int4 kernels measured
        here and the attention (`gptcli backends --json`; imports no torch)."""
        from gptcli.backends import int4_native, int8_native, native_attention
        from gptcli.backends.lean_tuning import cached_choice

        one_row, attention = cached_choice(default_threads()), native_attention.reported()
        int8, int4 = int8_native.reported_choice(default_threads()), int4_native.reported_choice(default_threads())
        return {
            **isa_summary(),
            "float32_one_row_kernel": one_row["kernel"] if one_row else None,
            "float32_one_row_reason": one_row["reason"] if one_row else "measured when a model is first decoded here",
            "int8_kernel": int8["kernel"],
            "int8_kernel_reason": int8["reason"],
            "int4_kernel": int4["kernel"],
            "int4_kernel_reason": int4["reason"],
            "attention": attention["kernel"],
            "attention_reason": attention["reason"],
        }

    @classmethod
    def load(cls, folder: Path, options: LoadOptions) -> TorchBackend:
        set_torch_threads(options.threads)
        precision = options.precision or "fp32"
        quantized = _check_precision(precision, options.device)
        device = "cpu" if quantized else resolve_device(options.device)  # quantized weights: CPU kernels
        if device == "cuda":
            _avoid_cudnn_attention()
        if device == "cpu":
            warning = cpu_dtype(options.dtype).warning
            if warning:
                (options.extra.get("notify") or _stderr)(warning)
        # auto with quantized weights: float32 around them (measured, 2 threads: int4 73 tok/s around float32,
        # 52 around bf16; int8 on gptcli's own kernel, Zen 5: 160-168 against 156-158)
        dtype = resolve_dtype("float32" if quantized and options.dtype == "auto" else options.dtype, device)
        cfg = read_config(folder)
        impl = impl_from_env()
        files = weight_files(folder)
        refusal, known = torch_lean_refusal(cfg, folder / "config.json") if impl != "hf" else (None, False)
        if impl != "hf" and files and refusal is None:
            return cls._load_lean(folder, cfg, files, device, dtype, precision)
        if quantized:
            why = "GPTCLI_TORCH_IMPL=hf" if impl == "hf" else refusal or "no safetensors weights"
            raise BackendError(
                f"--precision {precision} on torch needs the lean engine, which cannot run {folder.name}: {why}",
                hint="use --precision fp32, or --backend onnx for quantized weights",
            )
        if impl == "lean":
            raise ModelError(
                f"the lean torch engine cannot run {folder.name}: {refusal or 'no safetensors weights'}",
                hint="unset GPTCLI_TORCH_IMPL to run it on transformers' engine",
            )
        if device == "cpu" and options.dtype == "auto":
            # auto's bf16 pays off through the lean engine's packed matrices; transformers' bf16 linear
            # layers take torch's slow path on a CPU (the 49152-row head: 8.5 ms vs 5.2 in float32)
            dtype = resolve_dtype("float32", device)
        backend = cls._load_hf(folder, cfg, options, device, dtype)
        if known and refusal:
            backend.fallback_reason = f"{refusal}: running transformers' engine instead of the lean one"
        return backend

    @classmethod
    def _load_lean(
        cls, folder: Path, cfg: dict[str, Any], files: list[Path], device: str, dtype: Any, precision: str = "fp32"
    ) -> TorchBackend:
        """Straight from safetensors into the lean engine: no transformers import at all."""
        from gptcli.backends import lean_quant, torch_lean

        try:
            lean = torch_lean.build(cfg, files, device, dtype)
        except (KeyError, RuntimeError, ValueError, MemoryError) as exc:
            if allocation_failed(exc):
                raise out_of_memory(f"loading {folder}") from None
            raise ModelError(f"cannot load model from {folder}: {type(exc).__name__}: {exc}") from None
        quantized_bytes = lean_quant.quantize_model(lean, precision)
        if not quantized_bytes:
            lean_quant.pack_bf16(lean)  # bf16 on a CPU: oneDNN's packed layout, ~2x the speed of x @ W
        arch = (cfg.get("architectures") or [cfg["model_type"]])[0]
        engine = LeanEngine(lean)
        info = ModelInfo(
            folder.name,
            arch,
            lean.context_length,
            lean.vocab_size,
            lean.num_layers,
            lean.params,
            precision if quantized_bytes else str(dtype).removeprefix("torch."),
            device,
            kv_bytes_per_token=engine.kv_bytes_per_token(),
        )
        backend = cls(engine, info)
        backend.weights_bytes = quantized_bytes or None
        return backend

    @classmethod
    def _load_hf(cls, folder: Path, cfg: dict[str, Any], options: LoadOptions, device: str, dtype: Any) -> TorchBackend:
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=dtype,
                trust_remote_code=options.trust_remote_code,
                use_safetensors=not options.allow_pickle,
            )
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise ModelError(
                    f"{folder} needs custom code to load", hint="pass --trust-remote-code if you trust it"
                ) from None
            raise ModelError(f"cannot load model from {folder}: {exc}") from None
        except (OSError, RuntimeError, KeyError, MemoryError) as exc:
            if allocation_failed(exc):
                raise out_of_memory(f"loading {folder}") from None
            raise ModelError(f"cannot load model from {folder}: {exc}") from None
        model.to(device).eval()
        engine = HFEngine(model)
        info = ModelInfo(
            name=folder.name,
            architecture=type(model).__name__,
            context_length=context_length(cfg),
            vocab_size=model.config.vocab_size,
            num_layers=model.config.num_hidden_layers,
            params=sum(p.numel() for p in model.parameters()),
            dtype=str(dtype).removeprefix("torch."),
            device=device,
            kv_bytes_per_token=engine.kv_bytes_per_token(),
        )
        return cls(engine, info)

    @property
    def implementation(self) -> str:
        return "lean" if isinstance(self.engine, LeanEngine) else "hf"

    def new_cache(self) -> TorchCache:
        return TorchCache(self.engine.new_cache())

    def forward(self, ids: Sequence[int], cache: TorchCache) -> tuple[np.ndarray, TorchCache]:
        logits, _ = self.step([(ids, cache)])
        return logits[0], cache

    def step(self, batch: Sequence[tuple[Sequence[int], TorchCache]]) -> tuple[np.ndarray, list[TorchCache]]:
        """Logits [B, vocab] of each sequence's last position; cache i grows by len(ids_i)."""
        logits = self.engine.step(batch)
        for ids, cache in batch:
            cache.length += len(ids)
        return logits.cpu().numpy(), [cache for _, cache in batch]

    def score(self, ids: Sequence[int], cache: TorchCache) -> tuple[np.ndarray, TorchCache]:
        """Logits [len(ids), vocab] of every position of ids (scoring a text); the cache grows by len(ids)."""
        logits = self.engine.score(ids, cache.kv, cache.length)
        cache.length += len(ids)
        return logits.cpu().numpy(), cache

    def fork(self, cache: TorchCache, length: int) -> TorchCache:
        """A new cache holding a copy of the first `length` positions of `cache`."""
        length = min(length, cache.length)
        return TorchCache(self.engine.fork(cache.kv, length, cache.length), length)

    def truncate(self, cache: TorchCache, length: int) -> TorchCache:
        if length < cache.length:
            self.engine.truncate(cache.kv, length, cache.length)
            cache.length = length
        return cache
