"""`gptcli train`'s output: the progress on stderr while it trains, and what --dry-run prints."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from gptcli.cli import common as c


def print_dry_run(setup: Any, *, as_json: bool) -> None:
    """The resolved config and the model's numbers (a dry run builds no model): YAML-like lines, or one
    JSON object with --json (it printed YAML then)."""
    import yaml

    from gptcli.train.checkpoint import config_as_trained
    from gptcli.train.setup import describe

    info = {**describe(setup).as_dict(), "memory_estimate_bytes": setup.memory_bytes}
    config = config_as_trained(setup.cfg.to_dict(), setup.init_folder)
    if as_json:
        sys.stdout.write(json.dumps({"config": config, **info}, allow_nan=False) + "\n")
        return
    sys.stdout.write(yaml.safe_dump({"config": config}, sort_keys=False))
    for key, value in info.items():
        shown = f"{value:,}" if isinstance(value, int) else (f"{value:.3e}" if isinstance(value, float) else value)
        sys.stdout.write(f"{key}: {shown}\n")


class TrainRenderer:
    """Rich progress on stderr: one live line (step, loss, lr, tok/s, ETA) plus eval lines and samples."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Any = None
        self.task: Any = None
        self.last_step: Any = None  # the latest Step event
        self.data_progress: Any = None  # the data steps' bars (a StageProgress), while the data is prepared
        self.console = c.stderr_console()
        self.output_closed = False  # the reader of stdout or stderr went away (the run then stops, as asked)

    def __enter__(self) -> TrainRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def show(self, event: Any) -> None:
        """Show `event`; when the output's reader went away (`2>&1 | head`), go on quietly and stop the run at the
        step's end with a checkpoint (a BrokenPipeError ended it at once, exit 0, the steps since the last
        checkpoint lost)."""
        from gptcli.errors import silence_closed_pipes, stdout_reader_went_away

        try:
            self._show(event)
        except (BrokenPipeError, SystemExit) as exc:  # Rich says a closed pipe with SystemExit(1)
            if isinstance(exc, SystemExit) and not (exc.code == 1 and stdout_reader_went_away()):
                raise
            import signal

            from gptcli.train.signals import request_stop

            self.output_closed = True
            silence_closed_pipes()
            request_stop(signal.SIGPIPE)

    def _show(self, event: Any) -> None:
        from gptcli.train import events as ev

        if not self.enabled:
            return
        if isinstance(event, ev.Note):
            c.note(event.message)
        elif isinstance(event, ev.DataProgress):
            self.data_progress(event.stage, event.done, event.total)
        elif isinstance(event, ev.Started):
            self._start(event)
        elif isinstance(event, ev.Step):
            self.last_step = event
            text = f"step {event.step} · loss {event.loss:.4f} · lr {event.lr:.2e} · {event.tok_s:,} tok/s"
            if event.mfu is not None:
                text += f" · MFU {100 * event.mfu:.1f}%"
            self.progress.update(self.task, completed=event.step, description=text)
        elif isinstance(event, ev.Evaluated):
            last = self.last_step
            self.console.print(
                f"step {event.step}: train loss {last.loss if last else math.nan:.4f} · val loss {event.val_loss:.4f}"
                f" · ppl {event.val_ppl:.2f} · best {event.best_val_loss:.4f} · {last.tok_s if last else 0:,} tok/s",
                markup=False,
            )
            if event.sample:
                self.console.print(event.sample.rstrip(), markup=False, style="dim italic", highlight=False)
        elif isinstance(event, ev.Checkpointed):
            self.console.print(f"saved {event.path}", markup=False, style="dim")

    def _start(self, started: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        info = started.info
        self.console.print(
            f"training {info.params:,} parameters on {info.train_tokens:,} tokens"
            f" ({info.tokens_per_iter:,} tokens/step, {_flops(info.flops_per_iter)} FLOPs/step)"
            f" on {started.device}",
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
        self.task = self.progress.add_task("starting", total=started.max_iters, completed=started.start_step)


def _flops(value: float) -> str:
    exponent = min(4, int(math.log10(max(value, 1)) // 3))
    return f"{value / 1000**exponent:.2f}{' KMGT'[exponent].strip()}"
