"""A training run before its first step: config, run folder, --init model, token data, the model to train."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcli.errors import ConfigError, ModelError, UsageError
from gptcli.hardware import resolve_device
from gptcli.models import TOKENIZER_FILES
from gptcli.paths import RUNS_DIR, cache_dir, check_utf8_path
from gptcli.textio import human_bytes
from gptcli.train import checkpoint as ckpt
from gptcli.train.config import TrainConfig, load_config
from gptcli.train.data import EOT, UNK, TokenData, prepare
from gptcli.train.distributed import Dist, main_first, setup_distributed
from gptcli.train.errors import RunError
from gptcli.train.events import DataProgress, Note, RunInfo
from gptcli.train.lock import LOCK_FILE, check_unlocked
from gptcli.train.resume import check_checkpoint, resumed_config
from gptcli.train.step import estimated_flops_per_token, flops_per_token, load_causal_lm, new_gpt2

# The rough memory a training step takes (checked before anything big is allocated):
PARAM_BYTES = 16  # per parameter: float32 weights, gradients and AdamW's two moments
LAYER_FLOATS = 20  # activations kept for the backward pass, per token, layer and n_embd (measured: GPT-2, fp32)
LOGIT_FLOATS = 4  # per token and vocabulary entry: the logits, their float copy, log-softmax, gradients
# What a start writes before its first checkpoint: a folder holding only these (no run.json) is a
# failed start, which `--out` may reuse.
STARTUP_FILES = frozenset({*TOKENIZER_FILES, ckpt.CONFIG_FILE, ckpt.METRICS_FILE, ckpt.PLOT_FILE})


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate and the dry run need of the model, known without building it."""

    params: int
    layers: int
    width: int
    vocab: int
    folder: Path | None = None  # where the weights come from (--init or the checkpoint resumed)


def gpt2_shape(cfg: TrainConfig, vocab: int, block: int) -> ModelShape:
    """A fresh GPT-2's size, counted: token and position embeddings (the LM head is tied to the first),
    per layer two LayerNorms, attention (qkv + projection) and the 4x MLP, and the final LayerNorm."""
    h, n = cfg.model.n_embd, cfg.model.n_layer
    return ModelShape(vocab * h + block * h + n * (12 * h * h + 13 * h) + 2 * h, n, h, vocab)


def folder_shape(folder: Path) -> ModelShape:
    """A model folder's size from config.json and the safetensors headers: nothing is loaded (ModelError
    for a missing or corrupt file)."""
    from gptcli.hf import param_count, read_architecture, read_config, weight_files

    if not isinstance(read_config(folder).get("model_type"), str):
        raise ModelError(f"{folder / 'config.json'} names no model_type")
    if not weight_files(folder):
        raise ModelError(f"{folder / 'model.safetensors'} is missing")
    arch = read_architecture(folder)
    params = param_count(folder) or 0
    return ModelShape(params, arch.layers, arch.hidden, arch.vocab, folder)


def memory_needed(cfg: TrainConfig, shape: ModelShape, block: int, mixed: bool) -> tuple[int, int]:
    """(bytes for the weights, gradients and optimizer state, bytes of activations for one micro-batch).

    Rough on purpose: enough to refuse a run that cannot fit before it fills the memory."""
    tokens = cfg.train.batch_size * block
    layer_bytes = (2 if mixed else 4) * LAYER_FLOATS * shape.layers * shape.width  # bf16/fp16 under autocast
    return PARAM_BYTES * shape.params, tokens * (layer_bytes + 4 * LOGIT_FLOATS * shape.vocab)


def available_memory(cfg: TrainConfig, dist: Dist) -> tuple[int | None, str]:
    """The memory this process may use where it will train, and that device; None when unknown."""
    from gptcli.hardware import cuda_unusable_reason, free_memory_bytes

    if cfg.train.device != "cpu" and cuda_unusable_reason() is None:
        import torch  # noqa: F401  (free_memory_bytes reads CUDA's numbers through an imported torch)

        device = f"cuda:{dist.local_rank}"
        return free_memory_bytes(device), device
    if cfg.train.device == "cuda":
        return None, "cuda"  # not usable: the loop says so
    available = free_memory_bytes("cpu")
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun's processes on this machine
    return (available // processes if available is not None else None), "cpu"


def check_memory(cfg: TrainConfig, shape: ModelShape, block: int, dist: Dist, *, resuming: bool = False) -> int:
    """The estimated bytes a training step needs; ConfigError (exit 3) when that is over what is available."""
    available, device = available_memory(cfg, dist)
    mixed = device.startswith("cuda") and cfg.train.dtype != "float32"
    state, activations = memory_needed(cfg, shape, block, mixed)
    if available is None or state + activations <= available:
        return state + activations
    if resuming:
        lower = "the memory other programs use, or resume on a bigger machine (--device may change)"
    elif activations > state:
        lower = "train.batch_size (--batch-size, with --grad-accum to keep the tokens per step) or model.block_size"
    elif shape.folder is not None:
        lower = "the model size: fine-tune a smaller --init model"
    else:
        lower = "model.n_layer or model.n_embd" + (" or data.vocab_size" if shape.vocab > 4 * shape.width else "")
    raise ConfigError(
        f"training needs about {human_bytes(state + activations)} of memory ({human_bytes(state)} for"
        f" {shape.params:,} parameters with their gradients and AdamW state, {human_bytes(activations)} of"
        f" activations for batch_size {cfg.train.batch_size} x block_size {block}),"
        f" more than the {human_bytes(available)} available on {device}",
        hint=f"lower {lower}",
    )


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
    shape: ModelShape | None = None  # the model's size, known without building it
    memory_bytes: int = 0  # the estimated memory of a training step
    leftovers: tuple[Path, ...] = ()  # a failed start's files in `out`, removed before this start writes its own


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

    def notify(message: str) -> None:
        on_event(Note(message))

    def progress(stage: str, done: int, total: int | None, _step: str = "") -> None:  # an --init GGUF's too
        on_event(DataProgress(stage, done, total))

    resume_from, leftovers = None, ()
    shape: ModelShape | None = None
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise UsageError(
                f"--out {out} cannot be used with --resume: a resumed run continues in its own folder ({resume})",
                hint=f"drop --out (to branch the run, copy {resume} and resume the copy)",
            )
        check_unlocked(resume)
        cfg, resume_from, data_path = resumed_config(resume, data_path, preset, config_file, sets, flags)
        out = resume
    else:
        if data_path is None:
            raise ConfigError("no training data", hint="pass --data FILE_OR_FOLDER (or --resume RUN)")
        cfg = load_config(preset=preset, config_file=config_file, sets=sets, flags=flags)
        if cfg.init and Path(cfg.init).exists():  # a folder or file: recorded whole, so a resume finds it from anywhere
            cfg = load_config(base={**cfg.to_dict(), "init": str(Path(cfg.init).resolve())})
        out = out or default_out(data_path)
        check_utf8_path(out, "the tokenizers library takes", hint="give --out a folder whose name is UTF-8")
        check_unlocked(out)
        leftovers = _reusable(out)

    init_folder = None
    chat = None
    eot_token = None
    if cfg.init:
        from gptcli.models import resolve_model
        from gptcli.tokenizer import Tokenizer

        try:
            init_folder = resolve_model(cfg.init, notify=notify, progress=progress).path
        except ModelError:
            if resume_from is None or not (resume_from / "tokenizer.json").is_file():
                raise
            # The --init as typed is not found from here (a relative path from another folder, or moved since): the
            # checkpoint to resume holds what a resume reads of it (its tokenizer, chat template and shape).
            notify(f"note: this run's --init {cfg.init} is not found from here; its checkpoint stands for it")
            init_folder = resume_from
        if cfg.data.tokenizer != "init":
            cfg = load_config(base={**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "tokenizer": "init"}})
        tok = Tokenizer(init_folder)
        eot_token = tok.eos_token
        if tok.chat_template:

            def chat(messages: list[dict[str, str]]) -> str:
                return tok.render_chat(messages, add_generation_prompt=False)

    block = cfg.model.block_size
    if init_folder is not None:
        block = ckpt.init_block(block, init_folder)
        if block < cfg.model.block_size:
            notify(f"note: model.block_size {cfg.model.block_size} is past {cfg.init}'s context: training at {block}")
        try:
            shape = folder_shape(init_folder)
        except ModelError:
            shape = None  # weights in another format (pytorch_model.bin): its memory is not estimated
    dist = setup_distributed(resolve_device("cpu" if cfg.train.device == "cpu" else "auto"))
    # before the data (its vocabulary is not known yet for a fresh model: its share is counted after)
    if init_folder is None or shape is not None:
        check_memory(cfg, shape or gpt2_shape(cfg, 0, block), block, dist, resuming=resume is not None)
    if not dist.main:
        on_event = _silent
    streams = cfg.train.grad_accum * dist.world
    try:  # rank 0 tokenizes and fills the cache first; the others then read it
        with main_first(dist):
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
    except OSError as exc:  # a write to the spill or token file (a full disk) names no file: they are in the cache
        exc.filename = exc.filename or str(cache_dir() / "train-data")
        raise
    if init_folder is None:
        shape = gpt2_shape(cfg, data.vocab_size, block)
    memory = check_memory(cfg, shape, block, dist, resuming=resume is not None) if shape is not None else 0
    files = tokenizer_files(data, cfg, block, init_folder)
    if resume_from is not None:
        check_checkpoint(out, resume_from, cfg, data.vocab_size, block, init_folder, files["tokenizer.json"])
    return RunSetup(
        cfg, out, data_path.resolve(), data, files, init_folder, block, dist, resume_from, shape, memory, leftovers
    )


def _reusable(out: Path) -> tuple[Path, ...]:
    """The files of a failed start in `out` (reused by a new start); RunError for a folder that holds more."""
    if not out.exists():
        return ()
    if not out.is_dir():
        raise RunError(f"{out} is a file, not a folder", hint="pick a new --out")
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE]
    if not entries:
        return ()
    if ckpt.is_run(out):
        raise RunError(f"{out} is a training run", hint=f"continue it with --resume {out}, or pick a new --out")
    for p in entries:
        # its own files, or their temporaries (`.train_config.yaml.<random>.tmp`: killed mid-write)
        startup = p.is_file() and (p.name in STARTUP_FILES or any(p.name.startswith(f".{n}.") for n in STARTUP_FILES))
        # a first checkpoint that never completed (full disk, kill -9) leaves only temporaries
        if not startup and not (p.name == ckpt.CHECKPOINTS and _only_temporaries(p)):
            raise RunError(f"{out} is not empty (it holds {p.name})", hint="pick a new --out, or empty that folder")
    return tuple(entries)


def check_unchanged(setup: RunSetup) -> None:
    """Under the run's lock, before anything is written: the folder is still as resolve_run found it. The lock is
    taken to train, so another gptcli may have trained there while this one prepared its data (RunError)."""
    out = setup.out
    if setup.resume_from is None and ckpt.is_run(out):
        raise RunError(
            f"{out} became a training run while this one prepared its data",
            hint=f"continue it with --resume {out}, or pick a new --out",
        )
    if setup.resume_from is not None and ckpt.latest_checkpoint(out) != setup.resume_from:
        raise RunError(f"{out} was trained further while this one prepared its data", hint="resume it again")


def _only_temporaries(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and all(p.name.startswith(".tmp-") for p in folder.iterdir())


def _silent(_: Any) -> None:
    pass


def build_model(setup: RunSetup) -> Any:
    """The checkpoint being resumed, the --init model, or a fresh GPT-2 (seeded from train.seed).

    Training calls it first, before it writes to the run folder: a failed start's files go here."""
    import torch

    if setup.dist.main:
        for path in setup.leftovers:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    if setup.resume_from is not None:
        return _checkpoint_model(setup.resume_from)
    torch.manual_seed(setup.cfg.train.seed)
    if setup.init_folder is not None:
        return load_causal_lm(setup.init_folder)
    from gptcli.hardware import quiet_transformers

    quiet_transformers()
    return new_gpt2(setup.cfg, setup.data.vocab_size, setup.block_size, eot=setup.data.eot_id)


def _checkpoint_model(checkpoint: Path) -> Any:
    """A checkpoint's model; one whose files are missing or damaged is a RunError naming the file."""
    try:
        folder_shape(checkpoint)  # config.json and the safetensors headers, checked before anything is loaded
        return load_causal_lm(checkpoint)
    except ModelError as exc:
        raise RunError(exc.message, hint="the checkpoint is damaged") from None
    except Exception as exc:  # what transformers raises for a model it cannot build or read
        raise RunError(f"the model in {checkpoint} does not load ({ckpt.short_reason(exc)})") from None


def describe(setup: RunSetup, model: Any = None) -> RunInfo:
    """The run's numbers: counted on `model`, or computed from the model's shape without building it."""
    cfg = setup.cfg
    tokens_per_iter = cfg.train.batch_size * cfg.train.grad_accum * setup.block_size
    shape = setup.shape
    if model is None and shape is None:  # an --init model whose size is not known from its files
        model = load_causal_lm(setup.init_folder)
    if model is not None:
        params, per_token = sum(p.numel() for p in model.parameters()), flops_per_token(model, setup.block_size)
    else:
        assert shape is not None
        params = shape.params
        per_token = estimated_flops_per_token(params, shape.layers, shape.width, setup.block_size)
    return RunInfo(
        out=str(setup.out),
        data=str(setup.data_path),
        params=params,
        vocab_size=setup.data.vocab_size,
        block_size=setup.block_size,
        train_tokens=len(setup.data.train),
        val_tokens=len(setup.data.val),
        tokens_per_iter=tokens_per_iter,
        flops_per_iter=per_token * tokens_per_iter,
    )
