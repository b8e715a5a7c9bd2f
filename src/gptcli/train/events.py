"""What a training run reports, as small frozen events the trainer yields and the CLI renders."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    """The run's shape: where it goes, how big the model and data are, and the work in one step."""

    out: str
    data: str
    params: int
    vocab_size: int
    block_size: int
    train_tokens: int
    val_tokens: int
    tokens_per_iter: int
    flops_per_iter: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Note:
    message: str


@dataclass(frozen=True)
class DataProgress:
    """Preparing the data: `done` of `total` units (None: unknown) of a stage (reading, cleaning, BPE...)."""

    stage: str
    done: int
    total: int | None


@dataclass(frozen=True)
class Started:
    info: RunInfo
    start_step: int
    max_iters: int
    device: str


@dataclass(frozen=True)
class Step:
    """One optimizer step: its loss and learning rate, its time, and the model FLOPs utilisation if known."""

    step: int
    loss: float
    lr: float
    ms: float
    tok_s: int
    mfu: float | None = None

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl line (no `mfu` key where the peak FLOPS are unknown)."""
        line = {"step": self.step, "loss": self.loss, "lr": self.lr, "ms": self.ms, "tok_s": self.tok_s}
        return line if self.mfu is None else {**line, "mfu": self.mfu}


@dataclass(frozen=True)
class Evaluated:
    step: int
    val_loss: float
    val_ppl: float
    sample: str
    best_val_loss: float


@dataclass(frozen=True)
class Checkpointed:
    step: int
    path: str


@dataclass(frozen=True)
class Finished:
    """The end of a run, finished or interrupted; `as_dict()` is the `--json` summary."""

    info: RunInfo
    steps: int
    interrupted: bool
    train_loss: float
    val_loss: float
    best_val_loss: float | None
    best_step: int | None
    wall_s: float
    ms_per_iter: float | None
    tokens_per_s: int | None
    device: str
    world_size: int

    def as_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        del fields["info"]
        # A loss not measured yet (stopped before the first evaluation) is NaN here, null in JSON.
        fields = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}
        return {**self.info.as_dict(), **fields}


TrainEvent = Note | DataProgress | Started | Step | Evaluated | Checkpointed | Finished
