"""A short text sample from the model being trained, through the one decoding loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptcli.train.config import TrainConfig


def sample_text(model: Any, out: Path, cfg: TrainConfig, block: int, device: str, step: int) -> str:
    """A short sample through the one decoding loop (gptcli.decoding), with its own RNG."""
    from gptcli.backends.base import ModelInfo
    from gptcli.config import SamplingConfig
    from gptcli.decoding import Finished
    from gptcli.engine import generate
    from gptcli.tokenizer import Tokenizer

    tokenizer = Tokenizer(out)
    prompt = tokenizer.encode(cfg.eval.sample_prompt, add_special_tokens=False) or [0]
    room = block - len(prompt)
    if room <= 0 or cfg.eval.sample_tokens <= 0:
        return ""
    info = ModelInfo("training", type(model).__name__, block, model.config.vocab_size, 0, 0, "float32", device)
    params = SamplingConfig(
        temperature=0.8, top_k=200, top_p=1.0, min_p=0.0, max_tokens=min(room, cfg.eval.sample_tokens), seed=step
    )
    model.eval()
    try:
        text = ""
        for event in generate(_backend_over(model, info, device), tokenizer, prompt, params):
            if isinstance(event, Finished):
                text = event.text
    finally:
        model.train()
    return cfg.eval.sample_prompt + text


def _backend_over(model: Any, info: Any, device: str) -> Any:
    """The torch backend over the in-memory model (HF engine), whichever constructor this version has."""
    from gptcli.backends import torch_backend

    engine_cls = getattr(torch_backend, "HFEngine", None)
    if engine_cls is not None:
        return torch_backend.TorchBackend(engine_cls(model), info)
    return torch_backend.TorchBackend(model, info, device)  # type: ignore[call-arg]
