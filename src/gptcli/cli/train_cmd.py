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
from gptcli.cli.train_view import TrainRenderer, print_dry_run
from gptcli.errors import EXIT_INTERRUPTED, InputError, UsageError


def train(
    data: Annotated[
        Path | None,
        c.path_option("--data", "-d", folder=True, help="A text file, a folder of them, or JSONL (text / messages)."),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset", "-p", help="shakespeare-char | gpt2-small | tiny (see docs).", autocompletion=c.complete_preset
        ),
    ] = None,
    config: Annotated[Path | None, c.path_option("--config", "-c", help="A training YAML (over the preset).")] = None,
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="Override one key, e.g. --set optim.lr=3e-4 (repeatable).")
    ] = None,
    out: Annotated[
        Path | None, c.path_option("--out", "-o", folder=True, help="The run folder (default runs/<data name>).")
    ] = None,
    resume: Annotated[
        Path | None, c.path_option("--resume", folder=True, help="Continue this run where it stopped.")
    ] = None,
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
      gptcli train --data in.txt --preset shakespeare-char --out runs/shakespeare
      gptcli train --data corpus/ --preset gpt2-small --tokenizer bpe
      gptcli train --resume runs/shakespeare --max-iters 4000
      torchrun --standalone --nproc_per_node=2 -m gptcli train --data corpus/
    """
    from gptcli.train import loop
    from gptcli.train.distributed import shutdown_distributed
    from gptcli.train.errors import RankStopped

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
    if init is not None and tokenizer in ("char", "bpe"):  # it was replaced by the model's own, silently
        raise UsageError(
            f"--tokenizer {tokenizer} cannot go with --init: a fine-tuned model keeps its own tokenizer",
            hint="drop --tokenizer (or pass --tokenizer init)",
        )
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder", hint="give a folder for the run")
    if preset is None and config is None and resume is None:
        preset = "shakespeare-char"
    main_rank = os.environ.get("RANK", "0") == "0"
    renderer = TrainRenderer(enabled=main_rank)
    try:
        # a bar for each data step that lasts (reading, cleaning, BPE, tokenizing); quick ones show none
        with c.StageProgress(enabled=main_rank, show_after=0.5, transient=False) as renderer.data_progress:
            try:
                setup = loop.resolve_run(
                    data_path=data,
                    out=out,
                    resume=resume,
                    preset=preset,
                    config_file=config,
                    sets=sets or [],
                    flags=flags,
                    on_event=renderer.show,
                )
            except KeyboardInterrupt:  # before the first step: there is no checkpoint to save
                if main_rank:
                    _say_interrupted_before_training(renderer.data_progress.stage)
                raise typer.Exit(EXIT_INTERRUPTED) from None
        if dry_run:
            print_dry_run(setup, as_json=as_json)
            return
        with renderer:
            try:
                finished = loop.train(setup, renderer.show)
            except KeyboardInterrupt:  # before the loop took the signals (the model being built), or a second one
                if renderer.last_step is not None:
                    raise
                if main_rank:
                    _say_interrupted_before_training("the model being built")
                raise typer.Exit(EXIT_INTERRUPTED) from None
        shutdown_distributed(together=True)
    except RankStopped as exc:  # rank 0 failed and says why: the other ranks of a torchrun leave quietly
        raise typer.Exit(exc.exit_code) from None
    finally:
        shutdown_distributed()
    if not main_rank:
        return
    if as_json:
        sys.stdout.write(json.dumps(finished.as_dict(), allow_nan=False) + "\n")
    val = f"val loss {finished.val_loss:.4f}" if math.isfinite(finished.val_loss) else "no val loss yet"
    c.stderr_console().print(
        f"{'interrupted at' if finished.interrupted else 'finished'} step {finished.steps}"
        f" · {val} · {finished.wall_s:.1f} s · {finished.tokens_per_s or 0:,} tok/s"
        f" · model in {setup.out}",
        markup=False,
    )
    if finished.interrupted:
        c.stderr_console().print(f"resume with: gptcli train --resume {setup.out}", markup=False, style="dim")
        if not renderer.output_closed:  # a closed pipe stops quietly, exit 0, as every command's does
            raise typer.Exit(EXIT_INTERRUPTED)


def _say_interrupted_before_training(stage: str | None) -> None:
    """Ctrl-C while the run was set up (an --init GGUF converted, a BPE trained): what it stopped, what is kept."""
    where = f" ({stage})" if stage else ""
    message = f"interrupted before the first step{where}: nothing was saved"
    c.stderr_console().print(message, style="yellow", markup=False)
