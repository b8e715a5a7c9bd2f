"""`gptcli runs list|show`: the training runs under a folder, and one run's config and results."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gptcli.cli import common as c
from gptcli.cli.helpfmt import HelpGroup
from gptcli.cli.render import add_row
from gptcli.errors import InputError
from gptcli.paths import RUNS_DIR

app = typer.Typer(
    help="List and inspect training runs (folders made by `gptcli train`).",
    no_args_is_help=True,
    cls=HelpGroup,
    rich_markup_mode=None,
)


def _summary(run: Path) -> dict[str, Any]:
    from gptcli.train import checkpoint as ckpt
    from gptcli.train.metrics import read_metrics

    if not run.is_dir():
        what = "is not a folder" if run.exists() else "does not exist"
        raise InputError(f"{run} {what}", hint="pass a folder made by `gptcli train`")
    if not ckpt.is_run(run):
        raise InputError(f"{run} is not a training run (no {ckpt.RUN_FILE} and {ckpt.CONFIG_FILE})")
    try:
        info = ckpt.run_record(run)
    except ValueError as exc:
        raise InputError(f"{run / ckpt.RUN_FILE}: cannot read it: {exc}") from None
    last_loss = last_val = None
    for record in read_metrics(run / ckpt.METRICS_FILE):
        if "loss" in record:
            last_loss = record["loss"]
        if "val_loss" in record:
            last_val = record["val_loss"]
    summary = {
        "run": str(run),
        "step": info.get("step"),
        "train_loss": last_loss,
        "val_loss": last_val,
        "best_val_loss": info.get("best_val_loss"),
        "best_step": info.get("best"),
        "latest": info.get("latest"),
        "data": info.get("data"),
        "created": info.get("created"),
        "checkpoints": [p.name for p in ckpt.list_checkpoints(run)],
    }
    # a NaN validation loss (an fp16 evaluation that overflowed) is null: --json prints JSON, not `NaN`
    return {key: None if isinstance(v, float) and not math.isfinite(v) else v for key, v in summary.items()}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


@app.command("list")
def list_runs(
    root: Annotated[Path, c.path_argument("Folder holding run folders.", folder=True)] = RUNS_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the runs under ROOT (default ./runs) with their step and losses.

    Example:
      gptcli runs list runs/
    """
    from gptcli.train import checkpoint as ckpt

    if not root.is_dir():
        raise InputError(f"no such folder: {root}", hint="pass the folder that holds your runs")
    candidates = [root] if ckpt.is_run(root) else sorted(p for p in root.iterdir() if p.is_dir())
    rows = []
    for candidate in (p for p in candidates if ckpt.is_run(p)):
        try:
            rows.append(_summary(candidate))
        except InputError as exc:  # one damaged run does not hide the others
            from gptcli.cli.render import warn

            warn(f"skipped {exc.message}")
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    from rich.table import Table

    from gptcli.cli.render import stdout_console

    table = Table("run", "step", "train loss", "val loss", "best val", "created", box=None, pad_edge=False)
    for r in rows:
        add_row(
            table,
            r["run"],
            _fmt(r["step"]),
            _fmt(r["train_loss"]),
            _fmt(r["val_loss"]),
            _fmt(r["best_val_loss"]),
            _fmt(r["created"]),
        )
    stdout_console().print(table)


@app.command("show")
def show(
    run: Annotated[
        Path, c.path_argument("A run folder, or a run's name under ./runs (as `runs list` shows).", folder=True)
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one run: its results, checkpoints and resolved training config.

    Example:
      gptcli runs show runs/shakespeare
    """
    import textwrap

    import yaml

    from gptcli.textio import read_yaml
    from gptcli.train import checkpoint as ckpt
    from gptcli.train.checkpoint import config_as_trained

    if not run.exists() and not run.is_absolute() and (RUNS_DIR / run).is_dir():
        run = RUNS_DIR / run
    summary = _summary(run)
    config = read_yaml(run / ckpt.CONFIG_FILE)
    # the run folder holds its latest weights: an --init run's model is read from there
    summary["config"] = config_as_trained(config, run) if isinstance(config, dict) else config
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    for key, value in summary.items():
        if key == "config":
            sys.stdout.write("config:\n" + textwrap.indent(yaml.safe_dump(value, sort_keys=False), "  "))
        elif key == "checkpoints":
            sys.stdout.write(f"{key}: {', '.join(value) or '-'}\n")
        else:
            sys.stdout.write(f"{key}: {_fmt(value)}\n")
