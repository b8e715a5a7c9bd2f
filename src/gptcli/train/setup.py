"""A training run before its first step: config, run folder, --init model, token data, the model to train."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcli.errors import ConfigError
from gptcli.hardware import resolve_device
from gptcli.models import TOKENIZER_FILES
from gptcli.paths import RUNS_DIR
from gptcli.train import checkpoint as ckpt
from gptcli.train.config import TrainConfig, incompatible_changes, load_config
from gptcli.train.data import EOT, UNK, TokenData, prepare
from gptcli.train.distributed import Dist, barrier, setup_distributed
from gptcli.train.errors import RunError
from gptcli.train.events import DataProgress, Note, RunInfo
from gptcli.train.lock import LOCK_FILE, check_unlocked
from gptcli.train.step import flops_per_token, load_causal_lm, new_gpt2


@dataclass
class RunSetup:
    """Everything resolved before the first step."""

    cfg: TrainConfig
    out: Path
    data_path: Path
    data: TokenData
    files: dict[str, bytes]
    init_folder: Path | None
    block_size: int
    dist: Dist
    resume_from: Path | None = None


def tokenizer_files(data: TokenData, cfg: TrainConfig, block: int, init_folder: Path | None) -> dict[str, bytes]:
    """The tokenizer files every checkpoint carries (the --init model's own files when fine-tuning)."""
    if init_folder is not None and cfg.data.tokenizer == "init":
        return {n: (init_folder / n).read_bytes() for n in TOKENIZER_FILES if (init_folder / n).is_file()}
    special = {"unk_token": UNK} if cfg.data.tokenizer == "char" else {"eos_token": EOT, "bos_token": EOT}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block, **special}
    return {
        "tokenizer.json": data.tokenizer_json.encode("utf-8"),
        "tokenizer_config.json": json.dumps(config, indent=2).encode("utf-8"),
    }


def default_out(data_path: Path) -> Path:
    base = RUNS_DIR / (data_path.stem or "run")
    out, n = base, 2
    while out.exists():
        out, n = base.with_name(f"{base.name}-{n}"), n + 1
    return out


def resolve_run(
    *,
    data_path: Path | None,
    out: Path | None,
    resume: Path | None,
    preset: str | None,
    config_file: Path | None,
    sets: list[str],
    flags: dict[str, Any],
    on_event: Callable[[Note | DataProgress], None] = lambda _: None,
) -> RunSetup:
    """Config, run folder, init model and token data: all the checks that can fail before training.

    Notes and the data steps' progress go to `on_event` (on rank 0 only).
    """
    import yaml

    def notify(message: str) -> None:
        on_event(Note(message))

    def progress(stage: str, done: int, total: int | None) -> None:
        on_event(DataProgress(stage, done, total))

    resume_from = None
    if resume is not None:
        check_unlocked(resume)
        info = ckpt.read_run(resume)
        saved = load_config(base=yaml.safe_load((resume / ckpt.CONFIG_FILE).read_text(encoding="utf-8")))
        cfg = load_config(base=saved.to_dict(), preset=preset, config_file=config_file, sets=sets, flags=flags)
        changed = incompatible_changes(saved, cfg)
        if changed:
            raise RunError(
                f"cannot resume {resume} with a different {', '.join(changed)}",
                hint="only train.max_iters, train.device/threads/compile, eval.* and checkpoint.* may change",
            )
        resume_from = ckpt.latest_checkpoint(resume)
        if resume_from is None:
            raise RunError(f"cannot resume {resume}: it has no complete checkpoint yet", hint="start it again")
        data_path = data_path or Path(info["data"])
        out = resume
    else:
        if data_path is None:
            raise ConfigError("no training data", hint="pass --data FILE_OR_FOLDER (or --resume RUN)")
        cfg = load_config(preset=preset, config_file=config_file, sets=sets, flags=flags)
        out = out or default_out(data_path)
        check_unlocked(out)
        if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir())):
            what = "a training run" if ckpt.is_run(out) else "not empty"
            raise RunError(f"{out} is {what}", hint=f"continue it with --resume {out}, or pick a new --out")

    init_folder = None
    chat = None
    eot_token = None
    if cfg.init:
        from gptcli.models import resolve_model
        from gptcli.tokenizer import Tokenizer

        init_folder = resolve_model(cfg.init, notify=notify).path
        if cfg.data.tokenizer != "init":
            cfg = load_config(base={**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "tokenizer": "init"}})
        tok = Tokenizer(init_folder)
        eot_token = tok.eos_token
        if tok.chat_template:

            def chat(messages: list[dict[str, str]]) -> str:
                return tok.render_chat(messages, add_generation_prompt=False)

    block = cfg.model.block_size
    if init_folder is not None:
        from gptcli.hf import context_length, read_config

        block = min(block, context_length(read_config(init_folder)))
    dist = setup_distributed(resolve_device("cpu" if cfg.train.device == "cpu" else "auto"))
    if not dist.main:
        barrier(dist)  # rank 0 tokenizes and fills the cache first; the others then read it
        on_event = _silent
    streams = cfg.train.grad_accum * dist.world
    data = prepare(
        data_path,
        tokenizer=cfg.data.tokenizer,
        vocab_size=cfg.data.vocab_size,
        val_fraction=cfg.data.val_fraction,
        block_size=block,
        dedup_lines=cfg.data.dedup_lines,
        init_tokenizer=(init_folder / "tokenizer.json") if init_folder else None,
        chat=chat,
        eot_token=eot_token,
        streams=streams,
        notify=notify,
        progress=progress,
    )
    if dist.main:
        barrier(dist)
    files = tokenizer_files(data, cfg, block, init_folder)
    if resume_from is not None and (resume_from / "tokenizer.json").read_bytes() != files["tokenizer.json"]:
        raise RunError(f"cannot resume {out}: the corpus gives a different tokenizer now", hint="use the same --data")
    return RunSetup(cfg, out, data_path.resolve(), data, files, init_folder, block, dist, resume_from)


def _silent(_: Any) -> None:
    pass


def build_model(setup: RunSetup) -> Any:
    """The checkpoint being resumed, the --init model, or a fresh GPT-2 (seeded from train.seed)."""
    import torch

    if setup.resume_from is not None:
        return load_causal_lm(setup.resume_from)
    torch.manual_seed(setup.cfg.train.seed)
    if setup.init_folder is not None:
        return load_causal_lm(setup.init_folder)
    from gptcli.hardware import quiet_transformers

    quiet_transformers()
    return new_gpt2(setup.cfg, setup.data.vocab_size, setup.block_size, eot=setup.data.eot_id)


def describe(setup: RunSetup, model: Any) -> RunInfo:
    cfg = setup.cfg
    tokens_per_iter = cfg.train.batch_size * cfg.train.grad_accum * setup.block_size
    return RunInfo(
        out=str(setup.out),
        data=str(setup.data_path),
        params=sum(p.numel() for p in model.parameters()),
        vocab_size=setup.data.vocab_size,
        block_size=setup.block_size,
        train_tokens=len(setup.data.train),
        val_tokens=len(setup.data.val),
        tokens_per_iter=tokens_per_iter,
        flops_per_iter=flops_per_token(model, setup.block_size) * tokens_per_iter,
    )
