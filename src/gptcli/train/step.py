"""One training step, shared by `gptcli train` and `gptcli bench --mode train`: the fresh GPT-2, the mixed
precision, AdamW with decay groups, and one optimisation step (micro-batches, clipping, scaler, AdamW).

nanoGPT's recipe: bf16 autocast on CUDA (fp16 with a gradient scaler where bf16 is missing), weight
decay on matrices only, gradient accumulation over micro-batches, clipping of the global norm.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gptcli.train.config import TrainConfig


def new_gpt2(cfg: TrainConfig, vocab_size: int, block_size: int, eot: int | None = None) -> Any:
    """A freshly initialised GPT-2 of the config's shape (seed it first for reproducibility)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        resid_pdrop=m.dropout,
        embd_pdrop=m.dropout,
        attn_pdrop=m.dropout,
        bos_token_id=eot,
        eos_token_id=eot,
        # The same tanh-approximated GELU as GPT-2's gelu_new, but one fused kernel instead of five ops.
        activation_function="gelu_pytorch_tanh",
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def load_causal_lm(folder: Any) -> Any:
    """A causal LM from a model folder, in float32 (fine-tuning starts from it, resuming continues it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from gptcli.hardware import quiet_transformers

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@dataclass(frozen=True)
class MixedPrecision:
    """The autocast dtype (None: fp32 throughout) and the gradient scaler (enabled for fp16 only)."""

    dtype: Any
    scaler: Any

    def autocast(self) -> Any:
        import torch

        return torch.autocast("cuda", dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()

    @property
    def name(self) -> str:
        """'bf16', 'fp16' or 'fp32'."""
        return {"bfloat16": "bf16", "float16": "fp16"}.get(str(self.dtype).removeprefix("torch."), "fp32")


def mixed_precision(device: str, dtype: str) -> MixedPrecision:
    """The mixed precision for a device and train.dtype.

    On CUDA, unless float32 is asked for: bf16 autocast where supported, else fp16 with a scaler.
    """
    import torch

    amp_dtype = None
    if device.startswith("cuda") and dtype != "float32":
        wanted = dtype
        if wanted == "auto":
            wanted = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[wanted]
    return MixedPrecision(amp_dtype, torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's get_lr)."""
    o = cfg.optim
    if not o.decay_lr:
        return o.lr
    if step < o.warmup_iters:
        return o.lr * (step + 1) / (o.warmup_iters + 1)
    if step > o.lr_decay_iters:
        return o.min_lr
    ratio = (step - o.warmup_iters) / max(1, o.lr_decay_iters - o.warmup_iters)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (o.lr - o.min_lr)


def new_optimizer(model: Any, cfg: TrainConfig) -> Any:
    """AdamW (fused where available) with weight decay on matrices only."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    try:
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=betas)


def flops_per_token(model: Any, block: int) -> float:
    """nanoGPT's estimate for a built model (see estimated_flops_per_token)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    return estimated_flops_per_token(params, cfg.num_hidden_layers, cfg.hidden_size, block)


def estimated_flops_per_token(params: int, layers: int, width: int, block: int) -> float:
    """nanoGPT's estimate: 6N for the matmuls plus the attention term (PaLM appendix B)."""
    return 6 * params + 12 * layers * width * block


def loss_of(model: Any, x: Any, y: Any, precision: MixedPrecision) -> Any:
    """The mean next-token cross-entropy of a batch (the logits in float32 whatever the autocast)."""
    import torch.nn.functional as F

    with precision.autocast():
        logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def optimisation_step(
    model: Any,
    optimizer: Any,
    precision: MixedPrecision,
    micro_batches: Iterable[tuple[Any, Any]],
    accum: int,
    grad_clip: float,
    *,
    step_model: Any = None,
    no_sync: Callable[[], Any] | None = None,
) -> Any:
    """Forward and backward over `accum` micro-batches, clip, one optimizer step; returns the summed loss.

    `step_model` is what runs forward (compiled or DDP-wrapped; default: `model`). Under DDP, `no_sync`
    skips the gradient all-reduce on every micro-batch but the last.
    """
    import torch

    step_model = model if step_model is None else step_model
    scaler = precision.scaler
    total = None
    for micro, (x, y) in enumerate(micro_batches):
        sync = no_sync is None or micro == accum - 1
        with contextlib.nullcontext() if sync else no_sync():
            loss = loss_of(step_model, x, y, precision) / accum
            scaler.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total
