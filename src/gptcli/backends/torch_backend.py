"""The PyTorch backend: a transformers causal LM driven step by step against an explicit KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gptcli.backends.base import LoadOptions, ModelInfo
from gptcli.errors import BackendError, ModelError
from gptcli.models import context_length, read_config


@dataclass
class TorchCache:
    """transformers' DynamicCache plus the number of positions it holds."""

    kv: Any
    length: int = 0


def quiet_transformers() -> None:
    """No progress bars or deprecation chatter from transformers on our stderr."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")


def resolve_device(requested: str) -> str:
    """'auto' → 'cuda' when a GPU is usable, else 'cpu'. Explicit 'cuda' without one is an error."""
    import torch

    if requested == "cpu":
        return "cpu"
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise BackendError("CUDA requested but no GPU is available", hint="use --device cpu or --device auto")
    return "cuda" if has_cuda else "cpu"


def resolve_dtype(requested: str, device: str) -> Any:
    import torch

    if requested == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


class TorchBackend:
    """transformers AutoModelForCausalLM on CPU or CUDA; prefill once, then one token per step."""

    name: ClassVar[str] = "torch"

    def __init__(self, model: Any, info: ModelInfo, device: str) -> None:
        import inspect

        self.model = model
        self.info = info
        self.device = device
        # transformers 5.x renamed `past_key_values` to `cache`; older releases only know the old name.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def unavailable_reason(cls, device: str = "auto") -> str | None:
        import importlib.util

        for package in ("torch", "transformers"):
            if importlib.util.find_spec(package) is None:
                return f"{package} is not installed"
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "CUDA requested but no GPU is available"
        return None

    @classmethod
    def load(cls, folder: Path, options: LoadOptions) -> TorchBackend:
        import torch
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        if options.threads:
            torch.set_num_threads(options.threads)
        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
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
        except (OSError, RuntimeError, KeyError) as exc:
            raise ModelError(f"cannot load model from {folder}: {exc}") from None
        model.to(device).eval()
        cfg = read_config(folder)
        info = ModelInfo(
            name=folder.name,
            architecture=type(model).__name__,
            context_length=context_length(cfg),
            vocab_size=model.config.vocab_size,
            num_layers=model.config.num_hidden_layers,
            params=sum(p.numel() for p in model.parameters()),
            dtype=str(dtype).removeprefix("torch."),
            device=device,
        )
        return cls(model, info, device)

    def new_cache(self) -> TorchCache:
        from transformers import DynamicCache

        return TorchCache(DynamicCache(config=self.model.config))

    def forward(self, ids: Sequence[int], cache: TorchCache) -> tuple[np.ndarray, TorchCache]:
        import torch

        n = len(ids)
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(cache.length, cache.length + n, device=self.device).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache.kv},
            )
        logits = out.logits[0, -1].float().cpu().numpy()
        cache.length += n
        return logits, cache

    def truncate(self, cache: TorchCache, length: int) -> TorchCache:
        if length < cache.length:
            cache.kv.crop(length - cache.length)  # negative: drop that many positions from the end
            cache.length = length
        return cache
