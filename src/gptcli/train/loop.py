"""The training loop: nanoGPT's recipe over a transformers GPT-2 (or any causal LM with --init).

Linear warmup then cosine decay, gradient accumulation, periodic evaluation with a sample, NaN stop,
atomic checkpoints, bit-exact resume on CPU, and DistributedDataParallel under torchrun; one step is
gptcli.train.step's. Everything the user sees is an event this module yields (gptcli.train.events);
it never prints.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.errors import ModelError
from gptcli.hardware import peak_flops, resolve_device, torch_threads
from gptcli.train import checkpoint as ckpt
from gptcli.train.batches import Batches, blocks
from gptcli.train.distributed import main_checked, main_first
from gptcli.train.errors import DivergedError, RunError
from gptcli.train.events import Checkpointed, Evaluated, Finished, Note, Started, Step, TrainEvent
from gptcli.train.lock import run_lock
from gptcli.train.metrics import MetricsLog, plot_losses, truncate_metrics
from gptcli.train.resume import check_checkpoint, check_recorded_config, check_recorded_optimizer
from gptcli.train.sample import sample_text
from gptcli.train.setup import RunSetup, build_model, check_unchanged, describe, resolve_run
from gptcli.train.signals import StopSignals
from gptcli.train.step import loss_of, lr_at, mixed_precision, new_optimizer, optimisation_step

__all__ = ["RunSetup", "lr_at", "resolve_run", "train", "training"]


def training(setup: RunSetup) -> Iterator[TrainEvent]:
    """Train to cfg.train.max_iters (or until a signal), yielding events; the last one is `Finished`.

    Only rank 0 writes the run folder and reports; every rank gets its `Finished`.
    """
    with torch_threads(setup.cfg.train.threads), ExitStack() as held:
        with main_first(setup.dist):  # the others wait for rank 0 to lock and check the folder
            if setup.dist.main:
                held.enter_context(run_lock(setup.out))
                check_unchanged(setup)
        for event in _Run(setup).events():
            if setup.dist.main or isinstance(event, Finished):
                yield event


def train(setup: RunSetup, on_event: Callable[[TrainEvent], None] = lambda _: None) -> Finished:
    """`training` run to its end, each event handed to `on_event`; returns the `Finished` event."""
    finished = None
    for event in training(setup):
        on_event(event)
        finished = event
    assert isinstance(finished, Finished)
    return finished


def _check_vocabulary(model: Any, setup: RunSetup) -> None:
    """An --init model whose tokenizer gives ids past its embeddings (tokens added without resizing them)
    fails at the first step with torch's IndexError: a ModelError before anything is written."""
    rows = model.get_input_embeddings().num_embeddings
    if setup.data.vocab_size > rows and (top := int(setup.data.tokens.max())) >= rows:
        raise ModelError(
            f"the tokenizer of {setup.cfg.init} gives token id {top} for this data, past the model's {rows} embeddings",
            hint="resize its embeddings to the tokenizer (resize_token_embeddings) and save it, or use another model",
        )


class _Run:
    """One run's live state: the model, its optimizer and precision, the step, the best validation loss."""

    def __init__(self, setup: RunSetup) -> None:
        import torch

        cfg, dist = setup.cfg, setup.dist
        self.setup, self.cfg, self.dist, self.out = setup, cfg, dist, setup.out
        self.signals: StopSignals | None = None  # while training: what an evaluation checks between its batches
        device = resolve_device(cfg.train.device)
        if device == "cuda" and dist.world > 1:
            device = f"cuda:{dist.local_rank}"
            torch.cuda.set_device(device)
        self.device = device
        self.precision = mixed_precision(device, cfg.train.dtype)
        self.notes: list[str] = []
        if cfg.train.dtype in ("bfloat16", "float16") and not device.startswith("cuda"):  # it was ignored silently
            self.notes.append(f"train.dtype {cfg.train.dtype} applies on CUDA only: the CPU trains in float32")
        self.unreadable: list[tuple[Path, str]] = []  # checkpoints newer than the one resumed, and why
        state = None
        if setup.resume_from is None:
            self.model = build_model(setup).to(device)
            _check_vocabulary(self.model, setup)
            self.optimizer = new_optimizer(self.model, cfg)
        else:
            state = self._resumable()
            setup = self.setup
        self.model.train()
        self._prepare_folder()
        accum = cfg.train.grad_accum
        self.batches = Batches(
            setup.data.train, accum * dist.world, setup.block_size, cfg.train.batch_size, cfg.train.seed, device
        )
        self.my_streams = [dist.rank * accum + i for i in range(accum)]
        self.step, self.best_val, self.best_step = 0, math.inf, None
        self.info = describe(setup, self.model)
        self.tokens_per_step = self.info.tokens_per_iter * dist.world
        self.flops_per_step = self.info.flops_per_iter * dist.world
        self.peak = peak_flops(device, self.precision.dtype is not None)
        self.run_info = {"data": str(setup.data_path), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with main_checked(dist):  # rank 0 alone sets aside unreadable checkpoints and trims the metrics
            if state is not None:
                self._restore(state)
            if setup.resume_from is not None:
                saved = ckpt.read_run(self.out)
                self.run_info = {**saved, **self.run_info, "created": saved.get("created")}
                if dist.main:
                    truncate_metrics(self.out / ckpt.METRICS_FILE, self.step)
            self.metrics = MetricsLog(self.out, enabled=dist.main)
        self.step_model = self._wrapped(self.model)
        self.step_seconds = 0.0

    def _prepare_folder(self) -> None:
        """Rank 0 writes the tokenizer (the sampler reads it) and the config; the others wait for it."""
        with main_first(self.dist):
            if self.dist.main:
                import yaml

                self.out.mkdir(parents=True, exist_ok=True)
                ckpt.remove_stale_temporaries(self.out, self.setup.files)
                for name, data in self.setup.files.items():
                    ckpt.write_atomic(self.out / name, data)
                config = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False).encode()
                ckpt.write_atomic(self.out / ckpt.CONFIG_FILE, config)

    def _resumable(self) -> dict[str, Any]:
        """Load the newest checkpoint whose training state, weights and optimizer state all read back: the
        model, the optimizer and self.setup resume from it; returns its state. Those newer that do not are
        listed in self.unreadable (_restore sets them aside); none readable: RunError."""
        latest, setup = self.setup.resume_from, self.setup
        assert latest is not None
        for checkpoint in reversed([p for p in ckpt.list_checkpoints(self.out) if p.name <= latest.name]):
            if checkpoint != latest:  # resolve_run checked the newest: one fallen back to must be this run's too
                vocab, tokenizer = setup.data.vocab_size, setup.files["tokenizer.json"]
                check_checkpoint(self.out, checkpoint, self.cfg, vocab, setup.block_size, setup.init_folder, tokenizer)
            self.setup = replace(setup, resume_from=checkpoint)
            try:
                state = ckpt.load_state(checkpoint)
                self.model = build_model(self.setup).to(self.device)
                self.optimizer = new_optimizer(self.model, self.cfg)
                self.optimizer.load_state_dict(state["optimizer"])
            except RunError as exc:
                self.unreadable.append((checkpoint, exc.message.replace(f"{checkpoint}{os.sep}", "")))
            except Exception as exc:  # the weights (safetensors, config.json), an optimizer state that does not fit
                if isinstance(exc, MemoryError) or "out of memory" in str(exc):
                    raise  # not the checkpoint's fault: an older one would not fit either
                self.unreadable.append((checkpoint, ckpt.short_reason(exc)))
            else:  # it reads back: the run's config must still give the settings and the optimizer it records
                check_recorded_optimizer(self.out, checkpoint, self.cfg, state)
                check_recorded_config(self.out, checkpoint, self.cfg, state)
                return state
        what = "; ".join(f"{path.name}: {why}" for path, why in self.unreadable)
        raise RunError(
            f"cannot resume {self.out}: no checkpoint reads back ({what})", hint="start it again (a new --out)"
        )

    def _restore(self, state: dict[str, Any]) -> None:
        import torch

        resumed = self.setup.resume_from
        assert resumed is not None
        if self.dist.main and (self.unreadable or ckpt.read_run(self.out).get("latest") != resumed.name):
            moved = ckpt.fall_back(self.out, resumed, state)
            reasons = {path.name: f"does not read back ({why})" for path, why in self.unreadable}
            for old, new in moved.items():
                what = reasons.get(old, "is incomplete")
                kept = f"kept as {resumed.parent / new}, resuming from {resumed.name}"
                self.notes.append(f"warning: {resumed.parent / old} {what}; {kept}")
        torch.set_rng_state(state["torch_rng"])
        scaler = self.precision.scaler
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self.step, self.best_val, self.best_step = (
            int(state["step"]),
            float(state["best_val_loss"]),
            state.get("best_step"),
        )

    def _wrapped(self, model: Any) -> Any:
        """What runs forward: DDP-wrapped under torchrun, compiled with train.compile."""
        import torch

        step_model = model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.local_rank] if self.device.startswith("cuda") else None
            step_model = DistributedDataParallel(model, device_ids=ids)
        if self.cfg.train.compile:
            step_model = torch.compile(step_model)
        return step_model

    def events(self) -> Iterator[TrainEvent]:
        cfg = self.cfg
        for note in self.notes:
            yield Note(note)
        if self.setup.resume_from is not None:
            yield Note(f"resuming {self.out} at step {self.step}")
        yield Started(self.info, self.step, cfg.train.max_iters, self.device)
        start_step, wall_start = self.step, time.perf_counter()
        last_loss = last_val = math.nan
        interrupted = False
        try:
            with StopSignals() as signals:
                self.signals = signals
                while self.step < cfg.train.max_iters:
                    # rank 0 alone logs, samples, plots and saves: the others learn whether it failed before
                    # they start the next step, whose collectives it would never join
                    with main_checked(self.dist):
                        stepped, stop = self._one_step(signals)
                        last_loss = stepped.loss
                        yield stepped
                        last = self.step == cfg.train.max_iters
                        if self.step % cfg.eval.interval == 0 or last:
                            evaluated = self._evaluate()
                            if evaluated is None:  # a signal cut it short: save this step and stop
                                stop = True
                            else:
                                last_val = evaluated.val_loss
                                yield evaluated
                        if self.step % cfg.checkpoint.interval == 0 or last or stop:
                            path = self._save()
                            if path is not None:
                                yield Checkpointed(self.step, str(path))
                    if stop:
                        interrupted = True
                        break
        finally:
            self.metrics.close()
        done = self.step - start_step
        yield Finished(
            info=self.info,
            steps=self.step,
            interrupted=interrupted,
            train_loss=last_loss,
            val_loss=last_val,
            best_val_loss=self.best_val if self.best_step else None,
            best_step=self.best_step,
            wall_s=round(time.perf_counter() - wall_start, 3),
            ms_per_iter=round(1000 * self.step_seconds / done, 3) if done else None,
            tokens_per_s=round(self.tokens_per_step * done / self.step_seconds) if done else None,
            device=self.device,
            world_size=self.dist.world,
        )

    def _one_step(self, signals: StopSignals) -> tuple[Step, bool]:
        """One optimizer step at the scheduled learning rate; (its event, whether a signal asks to stop)."""
        cfg, step = self.cfg, self.step
        started = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = optimisation_step(
            self.model,
            self.optimizer,
            self.precision,
            (self.batches.get(stream, step) for stream in self.my_streams),
            cfg.train.grad_accum,
            cfg.optim.grad_clip,
            step_model=self.step_model,
            no_sync=self.step_model.no_sync if self.dist.world > 1 else None,
        )
        self.step = step = step + 1
        loss, stop = self._agree(loss_sum, signals.received is not None)
        seconds = time.perf_counter() - started
        self.step_seconds += seconds
        if not math.isfinite(loss):
            saved = ckpt.list_checkpoints(self.out)
            # The checkpoints are kept (a finite loss, however large), but a resume keeps the run's optim settings
            # (resume.MAY_CHANGE): the fix is a new run. QA: the hint said "--resume", which refused --lr.
            raise DivergedError(
                f"the training loss became {loss} at step {step}; "
                + ("the checkpoints before it are kept" if saved else "no checkpoint was saved yet"),
                hint="start again with a lower --lr, or --set optim.grad_clip=1.0"
                + (" (a --resume keeps this run's optimizer settings)" if saved else ""),
            )
        mfu = round(self.flops_per_step / seconds / (self.peak * self.dist.world), 4) if self.peak else None
        event = Step(step, loss, lr, round(seconds * 1000, 3), round(self.tokens_per_step / seconds), mfu)
        self.metrics.write(event.record())
        return event, stop

    def _agree(self, loss_sum: Any, stop: bool) -> tuple[float, bool]:
        """The loss averaged over the ranks, and whether any rank received a signal."""
        if self.dist.world == 1:
            return loss_sum.item(), stop
        import torch
        import torch.distributed as tdist

        both = torch.stack([loss_sum.float(), torch.tensor(float(stop), device=self.device)])
        tdist.all_reduce(both)
        return both[0].item() / self.dist.world, both[1].item() > 0

    def _evaluate(self) -> Evaluated | None:
        """The validation loss (and a sample), logged; loss.png redrawn. None: a signal cut it short."""
        val = self._val_loss()
        if val is None:
            return None
        if val < self.best_val:
            self.best_val, self.best_step = val, self.step
        main = self.dist.main
        sample = (
            sample_text(self.model, self.out, self.cfg, self.setup.block_size, self.device, self.step) if main else ""
        )
        evaluated = Evaluated(self.step, val, math.exp(min(val, 50)), sample, self.best_val)
        self.metrics.write({"step": self.step, "val_loss": val, "val_ppl": evaluated.val_ppl, "sample": sample})
        if main:
            plot_losses(self.out)
        return evaluated

    def _val_loss(self) -> float | None:
        """The mean loss of eval.iters validation batches; None when Ctrl-C or SIGTERM came meanwhile (one
        process only: the ranks of a distributed run finish it together, to agree at the next step)."""
        import torch

        cfg, model, val = self.cfg, self.model, self.setup.data.val
        model.eval()
        gen = torch.Generator().manual_seed(cfg.train.seed + 7)
        with torch.no_grad():
            losses = []
            for _ in range(cfg.eval.iters):
                if self.dist.world == 1 and self.signals is not None and self.signals.received is not None:
                    model.train()
                    return None
                x, y = blocks(val, 0, len(val), self.setup.block_size, cfg.train.batch_size, gen, self.device)
                losses.append(loss_of(model, x, y, self.precision).item())
        model.train()
        return float(np.mean(losses))

    def _save(self) -> Path | None:
        """A checkpoint of this step (rank 0 only): weights, optimizer, RNG, scaler and the best so far."""
        if not self.dist.main:
            return None
        import torch

        scaler = self.precision.scaler
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "best_val_loss": self.best_val,
            "best_step": self.best_step,
            "config": self.cfg.to_dict(),  # what a resume must still be given (resume.check_recorded_config)
        }
        best_val = self.best_val if self.best_step else None
        return ckpt.save_checkpoint(
            self.out,
            self.step,
            self.model,
            self.setup.files,
            state,
            keep_last=self.cfg.checkpoint.keep_last,
            best_step=self.best_step,
            run_info={**self.run_info, "best": self.best_step, "best_val_loss": best_val},
        )
