"""metrics.jsonl (one line per step and per evaluation) and loss.png drawn from it."""

from __future__ import annotations

import contextlib
import errno
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptcli import atomicio
from gptcli.jsonl import parse_line
from gptcli.train import checkpoint as ckpt

MAX_LINE_BYTES = 64 << 20  # a metrics line (an evaluation's holds its sample); a longer one is skipped unread


class MetricsLog:
    """Appends JSON lines to a run's metrics.jsonl, flushed at once (a no-op on ranks other than 0)."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.out = out
        self.file = open(out / ckpt.METRICS_FILE, "a", encoding="utf-8") if enabled else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as exc:  # Python names no file; a torn last line is dropped on --resume
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ckpt.disk_full(self.out, str(self.out / ckpt.METRICS_FILE)) from None
                exc.filename = exc.filename or str(self.out / ckpt.METRICS_FILE)
                raise

    def close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            with contextlib.suppress(OSError):  # each line was flushed when written: a failed one was reported
                file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint being resumed (written after it, before the stop)."""
    if not path.is_file():
        return
    kept = [text for text, record in _records(path) if record["step"] <= step]  # unreadable lines go too
    ckpt.write_atomic(path, ("\n".join(kept) + "\n").encode() if kept else b"")


def plot_losses(out: Path) -> None:
    """loss.png: the training loss (and a running mean) and the validation loss, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, val_steps, vals = [], [], [], []
    for line in read_metrics(out / ckpt.METRICS_FILE):
        if _number(line.get("loss")):
            steps.append(line["step"])
            losses.append(line["loss"])
        elif _number(line.get("val_loss")):
            val_steps.append(line["step"])
            vals.append(line["val_loss"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="train")
    if len(losses) >= 20:
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="#3182bd", linewidth=1.5, label="train (mean)")
    ax.plot(val_steps, vals, "o-", color="#e6550d", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(out.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()  # drawn in memory, then written as the run's other files: an error names loss.png
    try:
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    try:
        atomicio.write_atomic(out / ckpt.PLOT_FILE, png.getvalue())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ckpt.disk_full(out, str(out / ckpt.PLOT_FILE)) from None
        raise


def read_metrics(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a metrics.jsonl, torn lines skipped (see _records); `runs show` reads them too."""
    for _, record in _records(path):
        yield record


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, record) for each record of metrics.jsonl. A line that does not read back as one (a write torn
    by kill -9 or a full disk: cut JSON, stray bytes) is skipped: it never stops a resume or a plot."""
    if not path.is_file():
        return
    with path.open("rb") as handle:  # a line at a time: the file grows with the run (and may be anything)
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # no record of ours is this long: skipped, never held
                    raw = handle.readline(MAX_LINE_BYTES)
                continue
            try:
                record = parse_line(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and _number(record.get("step")):
                yield raw.decode("utf-8").rstrip("\r\n"), record


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
