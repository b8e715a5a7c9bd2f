"""`gptcli train`: parse → resolve the run (config, data, tokens) → train → render progress on stderr."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gptcli.cli import common as c
from gptcli.errors import EXIT_INTERRUPTED


def train(
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="A text file, a folder of them, or JSONL (text / messages).")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset", "-p", help="shakespeare-char | gpt2-small | tiny (see docs).", autocompletion=c.complete_preset
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="A training YAML (over the preset).")] = None,
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="Override one key, e.g. --set optim.lr=3e-4 (repeatable).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The run folder (default runs/<data name>).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue this run where it stopped.")] = None,
    init: Annotated[str | None, typer.Option("--init", help="Fine-tune this model instead of a fresh GPT-2.")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="char | bpe | init.")] = None,
    vocab_size: Annotated[int | None, typer.Option("--vocab-size", help="BPE vocabulary size.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    max_iters: Annotated[int | None, typer.Option("--max-iters", help="Optimizer steps in total.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Sequences per micro-batch.")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per step.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for init and batches.")] = None,
    compile_model: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the config, parameters, tokens and FLOPs/iter; do not train.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout at the end.")] = False,
) -> None:
    """Train a GPT on your text (or fine-tune a model) into a Hugging Face-format run folder.

    Examples:
      gptcli train --data input.txt --preset shakespeare-char --out runs/shakespeare
      gptcli train --data corpus/ --preset gpt2-small --tokenizer bpe --vocab-size 8000
      gptcli train --resume runs/shakespeare --max-iters 4000
      torchrun --standalone --nproc_per_node=2 -m gptcli train --data corpus/ --preset tiny
    """
    from gptcli.train import loop

    flags: dict[str, Any] = {
        "init": init,
        "data.tokenizer": tokenizer,
        "data.vocab_size": vocab_size,
        "optim.lr": lr,
        "train.max_iters": max_iters,
        "train.batch_size": batch_size,
        "train.grad_accum": grad_accum,
        "train.device": device,
        "train.threads": threads,
        "train.seed": seed,
        "train.compile": compile_model,
    }
    if preset is None and config is None and resume is None:
        preset = "shakespeare-char"
    main_rank = os.environ.get("RANK", "0") == "0"
    notify = c.note if main_rank else (lambda _: None)
    try:
        # a bar for each data step that lasts (reading, cleaning, BPE, tokenizing); quick ones show none
        with c.StageProgress(enabled=main_rank, show_after=0.5, transient=False) as data_progress:
            setup = loop.resolve_run(
                data_path=data,
                out=out,
                resume=resume,
                preset=preset,
                config_file=config,
                sets=sets or [],
                flags=flags,
                notify=notify,
                progress=data_progress,
            )
        if dry_run:
            _dry_run(setup, loop)
            return
        with _Renderer(enabled=main_rank) as renderer:
            summary = loop.train(setup, renderer.report)
    finally:
        loop.shutdown_distributed()
    if not main_rank:
        return
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    c.stderr_console().print(
        f"{'interrupted at' if summary['interrupted'] else 'finished'} step {summary['steps']}"
        f" · val loss {summary['val_loss']:.4f} · {summary['wall_s']:.1f} s · {summary['tokens_per_s'] or 0:,} tok/s"
        f" · model in {setup.out}",
        markup=False,
    )
    if summary["interrupted"]:
        c.stderr_console().print(f"resume with: gptcli train --resume {setup.out}", markup=False, style="dim")
        raise typer.Exit(EXIT_INTERRUPTED)


def _dry_run(setup: Any, loop: Any) -> None:
    import yaml

    model = loop.build_model(setup)
    info = loop.describe(setup, model)
    sys.stdout.write(yaml.safe_dump({"config": setup.cfg.to_dict()}, sort_keys=False))
    for key, value in info.items():
        shown = f"{value:,}" if isinstance(value, int) else (f"{value:.3e}" if isinstance(value, float) else value)
        sys.stdout.write(f"{key}: {shown}\n")


class _Renderer:
    """Rich progress on stderr: one live line (step, loss, lr, tok/s, ETA) plus eval lines and samples."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Any = None
        self.task: Any = None
        self.last_step: dict[str, Any] | None = None
        self.console = c.stderr_console()

    def __enter__(self) -> _Renderer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def report(self, kind: str, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if kind == "note":
            c.note(data["message"])
        elif kind == "start":
            self._start(data)
        elif kind == "step":
            self.last_step = data
            text = f"step {data['step']} · loss {data['loss']:.4f} · lr {data['lr']:.2e} · {data['tok_s']:,} tok/s"
            if "mfu" in data:
                text += f" · MFU {100 * data['mfu']:.1f}%"
            self.progress.update(self.task, completed=data["step"], description=text)
        elif kind == "eval":
            ppl = data["val_ppl"]
            last = self.last_step or {}
            self.console.print(
                f"step {data['step']}: train loss {last.get('loss', math.nan):.4f} · val loss {data['val_loss']:.4f}"
                f" · ppl {ppl:.2f} · best {data['best_val_loss']:.4f} · {last.get('tok_s', 0):,} tok/s",
                markup=False,
            )
            if data.get("sample"):
                self.console.print(data["sample"].rstrip(), markup=False, style="dim italic", highlight=False)
        elif kind == "checkpoint":
            self.console.print(f"saved {data['path']}", markup=False, style="dim")

    def _start(self, data: dict[str, Any]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console.print(
            f"training {data['params']:,} parameters on {data['train_tokens']:,} tokens"
            f" ({data['tokens_per_iter']:,} tokens/step, {_flops(data['flops_per_iter'])} FLOPs/step)"
            f" on {data['device']}",
            markup=False,
        )
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task("starting", total=data["max_iters"], completed=data["start_step"])


def _flops(value: float) -> str:
    exponent = min(4, int(math.log10(max(value, 1)) // 3))
    return f"{value / 1000**exponent:.2f}{' KMGT'[exponent].strip()}"
