"""Run folders and checkpoints: atomic Hugging Face-format folders plus a weights_only training state.

A run folder looks like this (the top level is itself a model folder holding the latest weights):

    runs/shakespeare/
      config.json  model.safetensors  generation_config.json  tokenizer.json  tokenizer_config.json
      run.json             the data path, latest and best checkpoint (replaced atomically)
      train_config.yaml    the resolved training config
      metrics.jsonl        one JSON object per step and per eval
      loss.png             train and val loss, redrawn at each eval
      checkpoints/step-0000250/   the same model files + training_state.pt

Each checkpoint is written to a temporary folder and renamed into place, so a crash or a full disk
never leaves a half-written one; the top-level files are hard links replaced one by one with
os.replace.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gptcli import atomicio
from gptcli.hf import TRAINING_STATE_FILE
from gptcli.jsonl import parse_line
from gptcli.train.errors import DiskFullError, RunError

RUN_FILE = "run.json"
CONFIG_FILE = "train_config.yaml"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
STATE_FILE = TRAINING_STATE_FILE
CHECKPOINTS = "checkpoints"
DAMAGED = "damaged-"  # a checkpoint that did not read back on --resume is kept under this prefix
# What a resume needs from training_state.pt (scaler, best_step and config are optional: config came later).
STATE_KEYS = ("step", "optimizer", "torch_rng", "best_val_loss")
# The temporary files gptcli writes beside a run's own files: write_atomic's `.run.json.<pid>-<host>-<random>.tmp`
# (`.run.json.<random>.tmp` before), publish's `.config.json.<pid>.tmp` and the `.loss.png.<pid>.tmp.png`
# plot_losses wrote before it used write_atomic.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:[a-z0-9_-]+\.tmp|[0-9]+\.tmp\.png)")


def write_atomic(path: Path, data: bytes) -> None:
    """gptcli.atomicio.write_atomic, with a full disk reported as DiskFullError."""
    try:
        atomicio.write_atomic(path, data)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"no space left on device while writing {path}", hint="free some space") from None
        raise


def is_run(folder: Path) -> bool:
    return (folder / RUN_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def read_run(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise RunError(f"cannot resume {folder}: no such folder", hint="pass a folder made by `gptcli train`")
    if not is_run(folder):
        raise RunError(f"cannot resume {folder}: it is not a training run (no {RUN_FILE})", hint="check the path")
    try:
        return run_record(folder)
    except ValueError as exc:
        raise RunError(f"cannot resume {folder}: corrupt {RUN_FILE} ({exc})") from None


def run_record(folder: Path) -> dict[str, Any]:
    """run.json as a dict (`runs` reads it too); ValueError saying why it is not one (never another error)."""
    try:
        info = parse_line((folder / RUN_FILE).read_bytes())
    except OSError as exc:
        raise ValueError(exc.strerror or type(exc).__name__) from None
    if not isinstance(info, dict):
        raise ValueError("not a JSON object")
    return info


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint (one with its tokenizer.json first: a resume compares it with the corpus')."""
    steps = list_checkpoints(folder)
    whole = [p for p in steps if (p / "tokenizer.json").is_file()]
    return (whole or steps)[-1] if steps else None


def list_checkpoints(folder: Path) -> list[Path]:
    root = folder / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file())


def remove_stale_temporaries(folder: Path, names: Iterable[str] = ()) -> None:
    """Leftovers of a run killed mid-save (kill -9): temporary checkpoint folders that never got renamed, and
    the temporary files of the run's own files (run.json, the config, the metrics, the plot, a checkpoint's
    files published at the top level, `names`). The caller holds the run's lock: no other gptcli writes there."""
    root = folder / CHECKPOINTS
    ours = {RUN_FILE, CONFIG_FILE, METRICS_FILE, PLOT_FILE, *names}
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith("step-") and p.is_dir():
                ours.update(f.name for f in p.iterdir())
    for p in folder.iterdir():
        match = _TEMPORARY.fullmatch(p.name)
        if match and match["name"] in ours and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


# What torch.save's C++ stream writer says when a write fails short (a full disk): it drops the errno.
TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")


def _is_disk_full(exc: BaseException) -> bool:
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in TORCH_SHORT_WRITE)


def save_checkpoint(
    run: Path,
    step: int,
    model: Any,
    files: dict[str, bytes],
    state: dict[str, Any],
    *,
    keep_last: int,
    best_step: int | None,
    run_info: dict[str, Any],
) -> Path:
    """Write checkpoints/step-N atomically, publish its model files at the top level, rotate old ones."""
    import torch

    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    if not final.exists():
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp)
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            with open(tmp / STATE_FILE, "wb") as fh:  # a full disk is then an OSError, not torch's iostream error
                torch.save(state, fh)
            atomicio.apply_umask(tmp)  # transformers writes the weights 0600, the rest as open()
            for p in tmp.iterdir():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if _is_disk_full(exc):
                raise disk_full(run, f"checkpoint {final}") from None
            raise
    first = not is_run(run)
    try:
        publish(run, final)
        write_atomic(run / RUN_FILE, json.dumps({**run_info, "latest": final.name, "step": step}, indent=2).encode())
    except BaseException as exc:
        full = isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and _is_disk_full(exc))
        if first:  # no run.json: not resumable, and its model files make it no failed start either; go back to one
            for name in {p.name for p in final.iterdir()} - {STATE_FILE, *files}:
                (run / name).unlink(missing_ok=True)
            shutil.rmtree(final, ignore_errors=True)
            if full:
                raise disk_full(run, f"checkpoint {final}") from None
        elif full and not isinstance(exc, DiskFullError):
            raise DiskFullError(
                f"no space left on device while publishing {final} in {run}; the checkpoint itself is complete",
                hint=f"free some space, then `gptcli train --resume {run}`",
            ) from None
        raise
    rotate(run, keep_last, best_step)
    return final


def disk_full(run: Path, what: str) -> DiskFullError:
    """No space left while training wrote `what` (a checkpoint, the metrics): resume, or before the first
    checkpoint (no run.json yet), start again."""
    if is_run(run):  # run.json names an earlier checkpoint: a resume continues from it
        return DiskFullError(
            f"no space left on device while writing {what}; the previous checkpoints are intact",
            hint=f"free some space, then `gptcli train --resume {run}`",
        )
    return DiskFullError(  # the first checkpoint: nothing to resume, and a new start reuses the folder
        f"no space left on device while writing {what}; no checkpoint was saved yet",
        hint=f"free some space, then start the run again (the same command: it reuses {run})",
    )


def publish(run: Path, checkpoint: Path) -> None:
    """Make the top level of the run a loadable model folder holding this checkpoint's weights."""
    for src in checkpoint.iterdir():
        if src.name == STATE_FILE:
            continue
        dest = run / src.name
        tmp = run / f".{src.name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        try:
            os.replace(tmp, dest)
        except OSError as exc:  # a folder at `dest`: named by the temporary file, which goes
            tmp.unlink(missing_ok=True)
            raise type(exc)(exc.errno, exc.strerror, str(dest)) from None


def rotate(run: Path, keep_last: int, best_step: int | None) -> None:
    checkpoints = list_checkpoints(run)
    keep = set(checkpoints[-keep_last:])
    if best_step is not None:
        keep.add(run / CHECKPOINTS / f"step-{best_step:07d}")
    for path in checkpoints:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def recorded_config(checkpoint: Path) -> dict[str, Any] | None:
    """The config a checkpoint records it trained with (training_state.pt's "config", its tensors mapped, not
    read); None when it records none or does not read back (the resume then reports what it can)."""
    import torch

    try:
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


def init_block(block_size: int, model: Path) -> int:
    """The tokens an --init run trains on at a time: its model.block_size, capped at `model`'s context."""
    from gptcli.hf import context_length, read_config

    return min(block_size, context_length(read_config(model)))


def config_as_trained(config: dict[str, Any], model: Path | None) -> dict[str, Any]:
    """A run's config as the model it trains: for an --init run, the model section's shape and data.vocab_size are
    those of `model` (the init model's folder, or the run's own: the same shape), where the config keeps its preset's
    numbers, which an --init run does not use; block_size is what it trains at (capped at the model's context)."""
    if not config.get("init") or model is None:
        return config
    from gptcli.errors import ModelError
    from gptcli.hf import read_architecture

    section = dict(config.get("model") or {})
    block = section.get("block_size")
    try:
        arch = read_architecture(model)
        trained_block = init_block(block if isinstance(block, int) else arch.context, model)
    except (ModelError, OSError):
        return config  # the run's files are gone or damaged: the config as written
    section.update(n_layer=arch.layers, n_head=arch.heads, n_embd=arch.hidden, block_size=trained_block)
    return {**config, "model": section, "data": {**(config.get("data") or {}), "vocab_size": arch.vocab}}


def load_state(checkpoint: Path) -> dict[str, Any]:
    """training_state.pt, read with weights_only=True and checked for what a resume needs (else RunError)."""
    import torch

    path = checkpoint / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(f"{path} is unreadable ({short_reason(exc)})") from None
    if not isinstance(state, dict):
        raise RunError(f"{path} is not a training state (a {type(state).__name__}, not a dict)")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise RunError(f"{path} lacks {', '.join(map(repr, missing))}")
    wrong = [
        key
        for key, ok in (
            ("step", isinstance(state["step"], int) and not isinstance(state["step"], bool) and state["step"] >= 0),
            ("optimizer", isinstance(state["optimizer"], dict)),
            ("torch_rng", isinstance(state["torch_rng"], torch.Tensor) and state["torch_rng"].dtype == torch.uint8),
            ("best_val_loss", isinstance(state["best_val_loss"], (int, float))),
        )
        if not ok
    ]
    if wrong:
        raise RunError(f"{path} has a bad {', '.join(map(repr, wrong))}")
    return state


def short_reason(exc: BaseException) -> str:
    """What a library says is wrong with a file, in a few words: its first sentence, capped. Never torch's
    advice to load the file with weights_only=False (that would unpickle it: run its code)."""
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return "not a file of tensors and plain values"
    if isinstance(exc, EOFError):
        return "empty or cut short"
    text = str(exc).strip().split("\n")[0].split(". ")[0].strip() or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def fall_back(run: Path, checkpoint: Path, state: dict[str, Any]) -> dict[str, str]:
    """Make `checkpoint` the run's latest again when the newer ones do not read back: each newer step folder is
    kept as checkpoints/damaged-step-N (a new save of its step must not find it in place), the checkpoint's
    model files are published at the top level, run.json names it. Returns {old name: new name}."""
    root = run / CHECKPOINTS
    moved = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith("step-") and path.name > checkpoint.name and path.is_dir():
            target, n = root / f"{DAMAGED}{path.name}", 2
            while target.exists():
                target, n = root / f"{DAMAGED}{path.name}-{n}", n + 1
            os.rename(path, target)
            moved[path.name] = target.name
    publish(run, checkpoint)
    best = state.get("best_step")
    info = {
        **read_run(run),
        "latest": checkpoint.name,
        "step": state["step"],
        "best": best,
        "best_val_loss": float(state["best_val_loss"]) if best else None,
    }
    write_atomic(run / RUN_FILE, json.dumps(info, indent=2).encode())
    return moved
