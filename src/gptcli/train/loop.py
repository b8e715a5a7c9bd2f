"""The training loop: nanoGPT's recipe over a transformers GPT-2 (or any causal LM with --init).

AdamW (fused where available) with weight decay on matrices only, linear warmup then cosine decay,
gradient accumulation, clipping, bf16 autocast on CUDA (fp16 with a scaler), periodic evaluation
with a sample, NaN stop, atomic checkpoints, bit-exact resume on CPU, and DistributedDataParallel
under torchrun. Everything the user sees goes through `report(kind, data)`; this module never prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.errors import ConfigError
from gptcli.hardware import peak_flops, resolve_device, torch_threads
from gptcli.models import TOKENIZER_FILES
from gptcli.train import checkpoint as ckpt
from gptcli.train.config import TrainConfig, incompatible_changes, load_config
from gptcli.train.data import EOT, UNK, TokenData, prepare
from gptcli.train.errors import DivergedError, RunError

Report = Callable[[str, dict[str, Any]], None]


def _quiet(_: str, __: dict[str, Any]) -> None:
    pass


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


# ---------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(world, dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------- batches


class Batches:
    """Random blocks from the training tokens, one independent stream per micro-batch of a step.

    A step uses `grad_accum × world` streams; stream j samples only from shard j of the training
    tokens. Rank r runs streams r·accum … r·accum+accum-1, so a 2-process run and a 1-process run
    with twice the accumulation see exactly the same batches. Each (step, stream) draws from a
    generator seeded from (seed, stream, step): no sampler state to save, and a resumed run (on any
    number of processes) continues with exactly the batches it would have seen.
    """

    def __init__(self, tokens: np.ndarray, streams: int, block: int, batch: int, seed: int, device: str) -> None:
        import torch

        self.tokens, self.block, self.batch, self.device, self.seed = tokens, block, batch, device, seed
        size = len(tokens) // streams
        self.shards = [(j * size, size) for j in range(streams)]
        self.generator = torch.Generator()

    def get(self, stream: int, step: int) -> tuple[Any, Any]:
        start, size = self.shards[stream]
        mixed = (self.seed * 0x9E3779B1 + stream * 0x85EBCA77 + step * 0xC2B2AE3D) % (2**63)
        self.generator.manual_seed(mixed)
        return blocks(self.tokens, start, size, self.block, self.batch, self.generator, self.device)


def blocks(tokens: np.ndarray, start: int, size: int, block: int, batch: int, gen: Any, device: str) -> tuple:
    import torch

    ix = (torch.randint(size - block - 1, (batch,), generator=gen) + start).tolist()
    chunk = np.stack([tokens[i : i + block + 1] for i in ix]).astype(np.int64)
    data = torch.from_numpy(chunk)
    x, y = data[:, :-1], data[:, 1:]
    if device != "cpu":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


# ---------------------------------------------------------------- the run


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
    base = Path("runs") / (data_path.stem or "run")
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
    notify: Callable[[str], None] = lambda _: None,
    progress: Callable[[str, int, int | None], None] = lambda _, __, ___: None,
) -> RunSetup:
    """Config, run folder, init model and token data: all the checks that can fail before training."""
    import yaml

    resume_from = None
    if resume is not None:
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
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
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
        from gptcli.models import context_length, read_config

        block = min(block, context_length(read_config(init_folder)))
    dist = setup_distributed(resolve_device("cpu" if cfg.train.device == "cpu" else "auto"))
    if not dist.main:
        barrier(dist)  # rank 0 tokenizes and fills the cache first; the others then read it
        notify = _silent
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


def _silent(_: str) -> None:
    pass


def build_model(setup: RunSetup) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from gptcli.hardware import quiet_transformers

    quiet_transformers()
    if setup.resume_from is not None:
        return AutoModelForCausalLM.from_pretrained(setup.resume_from, dtype=torch.float32)
    torch.manual_seed(setup.cfg.train.seed)
    if setup.init_folder is not None:
        return AutoModelForCausalLM.from_pretrained(setup.init_folder, dtype=torch.float32)
    return new_gpt2(setup.cfg, setup.data.vocab_size, setup.block_size, eot=setup.data.eot_id)


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


def mixed_precision(device: str, dtype: str) -> tuple[Any, Callable[[], Any], Any]:
    """(autocast dtype or None, autocast context factory, gradient scaler) for a device and train.dtype.

    On CUDA, unless float32 is asked for: bf16 autocast where supported, else fp16 with a scaler.
    """
    import torch

    amp_dtype = None
    if device.startswith("cuda") and dtype != "float32":
        wanted = dtype
        if wanted == "auto":
            wanted = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[wanted]
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    return amp_dtype, autocast, torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)


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
    """nanoGPT's estimate: 6N for the matmuls plus the attention term (PaLM appendix B)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    layers, width = cfg.num_hidden_layers, cfg.hidden_size
    return 6 * params + 12 * layers * width * block


def describe(setup: RunSetup, model: Any) -> dict[str, Any]:
    cfg = setup.cfg
    tokens_per_iter = cfg.train.batch_size * cfg.train.grad_accum * setup.block_size
    return {
        "out": str(setup.out),
        "data": str(setup.data_path),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": setup.data.vocab_size,
        "block_size": setup.block_size,
        "train_tokens": len(setup.data.train),
        "val_tokens": len(setup.data.val),
        "tokens_per_iter": tokens_per_iter,
        "flops_per_iter": flops_per_token(model, setup.block_size) * tokens_per_iter,
    }


class _Signals:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second one interrupts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> _Signals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(setup: RunSetup, report: Report = _quiet) -> dict[str, Any]:
    """Train to cfg.train.max_iters (or until a signal). Returns the summary; only rank 0 writes."""
    report = report if setup.dist.main else _quiet
    with torch_threads(setup.cfg.train.threads):
        return _train(setup, report)


def _train(setup: RunSetup, report: Report) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    cfg, dist = setup.cfg, setup.dist
    device = resolve_device(cfg.train.device)
    if device == "cuda" and dist.world > 1:
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    use_cuda = device.startswith("cuda")
    amp_dtype, autocast, scaler = mixed_precision(device, cfg.train.dtype)

    model = build_model(setup).to(device)
    model.train()
    out = setup.out
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(out)
        for name, data in setup.files.items():  # the sampler's tokenizer reads these
            ckpt.write_atomic(out / name, data)
        import yaml

        ckpt.write_atomic(out / ckpt.CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    barrier(dist)

    optimizer = new_optimizer(model, cfg)

    accum = cfg.train.grad_accum
    batches = Batches(
        setup.data.train, accum * dist.world, setup.block_size, cfg.train.batch_size, cfg.train.seed, device
    )
    my_streams = [dist.rank * accum + i for i in range(accum)]
    step, best_val, best_step = 0, math.inf, None
    if setup.resume_from is not None:
        state = ckpt.load_state(setup.resume_from)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, best_val, best_step = int(state["step"]), float(state["best_val_loss"]), state.get("best_step")
        report("note", {"message": f"resuming {out} at step {step}"})

    raw_model = model
    step_model: Any = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model, device_ids=[dist.local_rank] if use_cuda else None)
    if cfg.train.compile:
        step_model = torch.compile(step_model)

    def loss_of(m: Any, x: Any, y: Any) -> Any:
        with autocast():
            logits = m(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

    @torch.no_grad()
    def evaluate() -> float:
        raw_model.eval()
        gen = torch.Generator().manual_seed(cfg.train.seed + 7)
        val = setup.data.val
        losses = [
            loss_of(raw_model, *blocks(val, 0, len(val), setup.block_size, cfg.train.batch_size, gen, device)).item()
            for _ in range(cfg.eval.iters)
        ]
        raw_model.train()
        return float(np.mean(losses))

    info = describe(setup, raw_model)
    tokens_per_step = info["tokens_per_iter"] * dist.world
    flops_per_step = info["flops_per_iter"] * dist.world
    peak = peak_flops(device, amp_dtype is not None)
    run_info = {"data": str(setup.data_path), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if setup.resume_from is not None:
        run_info = {**ckpt.read_run(out), **run_info, "created": ckpt.read_run(out).get("created")}
    if dist.main and setup.resume_from is not None:
        _truncate_metrics(out / ckpt.METRICS_FILE, step)
    metrics = open(out / ckpt.METRICS_FILE, "a", encoding="utf-8") if dist.main else None  # noqa: SIM115

    def log(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def save(current: int) -> Path | None:
        if not dist.main:
            return None
        state = {
            "step": current,
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "best_val_loss": best_val,
            "best_step": best_step,
        }
        path = ckpt.save_checkpoint(
            out,
            current,
            raw_model,
            setup.files,
            state,
            keep_last=cfg.checkpoint.keep_last,
            best_step=best_step,
            run_info={**run_info, "best": best_step, "best_val_loss": best_val if best_step else None},
        )
        report("checkpoint", {"step": current, "path": str(path)})
        return path

    report("start", {**info, "start_step": step, "max_iters": cfg.train.max_iters, "device": device})
    start_step = step
    wall_start = time.perf_counter()
    step_seconds = 0.0
    last_loss = math.nan
    last_val = math.nan
    interrupted = False
    try:
        with _Signals() as signals:
            while step < cfg.train.max_iters:
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                for micro, stream in enumerate(my_streams):
                    x, y = batches.get(stream, step)
                    sync = dist.world == 1 or micro == accum - 1
                    with contextlib.nullcontext() if sync else step_model.no_sync():
                        loss = loss_of(step_model, x, y) / accum
                        scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                if cfg.optim.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                stop = signals.received is not None
                if dist.world > 1:
                    import torch.distributed as tdist

                    both = torch.stack([loss_sum.float(), torch.tensor(float(stop), device=device)])
                    tdist.all_reduce(both)
                    last_loss, stop = both[0].item() / dist.world, both[1].item() > 0
                else:
                    last_loss = loss_sum.item()
                dt = time.perf_counter() - t0
                step_seconds += dt
                if not math.isfinite(last_loss):
                    raise DivergedError(
                        f"the training loss became {last_loss} at step {step}; the last good checkpoint is kept",
                        hint="lower --lr or set optim.grad_clip, then --resume (or start again)",
                    )
                tok_s = tokens_per_step / dt
                record = {"step": step, "loss": last_loss, "lr": lr, "ms": round(dt * 1000, 3), "tok_s": round(tok_s)}
                if peak:
                    record["mfu"] = round(flops_per_step / dt / (peak * dist.world), 4)
                log(record)
                report("step", record)

                if step % cfg.eval.interval == 0 or step == cfg.train.max_iters:
                    last_val = evaluate()
                    if last_val < best_val:
                        best_val, best_step = last_val, step
                    sample = _sample(raw_model, out, cfg, setup.block_size, device, step) if dist.main else ""
                    evaluation = {"step": step, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50))}
                    log({**evaluation, "sample": sample})
                    report("eval", {**evaluation, "sample": sample, "best_val_loss": best_val})
                    if dist.main:
                        plot_losses(out)
                due = step % cfg.checkpoint.interval == 0 or step == cfg.train.max_iters
                if due or stop:
                    save(step)
                if stop:
                    interrupted = True
                    break
    finally:
        if metrics is not None:
            metrics.close()
    wall = time.perf_counter() - wall_start
    done = step - start_step
    return {
        **info,
        "steps": step,
        "interrupted": interrupted,
        "train_loss": last_loss,
        "val_loss": last_val,
        "best_val_loss": best_val if best_step else None,
        "best_step": best_step,
        "wall_s": round(wall, 3),
        "ms_per_iter": round(1000 * step_seconds / done, 3) if done else None,
        "tokens_per_s": round(tokens_per_step * done / step_seconds) if done else None,
        "device": device,
        "world_size": dist.world,
    }


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint being resumed (written after it, before the stop)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line).get("step", 0) <= step]
    ckpt.write_atomic(path, ("\n".join(kept) + "\n").encode() if kept else b"")


def _sample(model: Any, out: Path, cfg: TrainConfig, block: int, device: str, step: int) -> str:
    """A short sample through the one decoding loop (gptcli.decoding), with its own RNG."""
    from gptcli.backends.base import ModelInfo
    from gptcli.config import SamplingConfig
    from gptcli.decoding import Finished, generate
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


def plot_losses(out: Path) -> None:
    """loss.png: the training loss (and a running mean) and the validation loss, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, val_steps, vals = [], [], [], []
    for line in _lines(out / ckpt.METRICS_FILE):
        if "loss" in line:
            steps.append(line["step"])
            losses.append(line["loss"])
        elif "val_loss" in line:
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
    tmp = out / f".{ckpt.PLOT_FILE}.{os.getpid()}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out / ckpt.PLOT_FILE)


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield json.loads(line)


def shutdown_distributed() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
