"""Pieces shared by commands: option types, settings resolution, input reading, stderr output."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from gptcli.errors import InputError
from gptcli.textio import decode_text, read_text_file

# Shell completion for option values. Each runs on a <TAB>, in a fresh process, so each reads only
# light modules and files: never torch, onnxruntime or transformers, and never a backend module.
Completion = list[tuple[str, str]]


def _matching(items: Completion, incomplete: str) -> Completion:
    seen: set[str] = set()
    out = []
    for value, help_text in items:
        if value.startswith(incomplete) and value not in seen:
            seen.add(value)
            out.append((value, help_text))
    return out


def complete_model(incomplete: str) -> Completion:
    """Catalogue names and aliases, then models in the cache (by the reference that reaches them)."""
    from gptcli.hf import read_source
    from gptcli.models import ALIASES, CATALOGUE
    from gptcli.paths import models_dir

    items = [(name, entry.description) for name, entry in CATALOGUE.items()]
    items += [(alias, f"alias of {target}") for alias, target in ALIASES.items()]
    root = models_dir()
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            source = None if folder.name in CATALOGUE or folder.name.startswith(".") else read_source(folder)
            if source is None:
                continue
            if source.startswith("hub:"):
                items.append((source.removeprefix("hub:"), "cached from the hub"))
            elif source.lower().endswith(".gguf") and Path(source).is_file():
                items.append((source, "GGUF, converted in the cache"))
            else:
                items.append((str(folder), f"cached: {source}"))
    return _matching(items, incomplete)


def complete_backend(incomplete: str) -> Completion:
    """Registered backends (built-ins, GPTCLI_BACKEND_PATHS, plugins), without importing any of them."""
    from gptcli.backends.base import list_backends

    try:
        items = [(s.name, s.origin) for s in list_backends() if not s.conflict]
    except Exception:  # completion must never print a traceback into the user's shell
        return []
    return _matching(items, incomplete)


def complete_backend_list(incomplete: str) -> Completion:
    """For comma-separated --backend lists (`bench`): complete the name after the last comma."""
    done, _, last = incomplete.rpartition(",")
    prefix = f"{done}," if done else ""
    chosen = set(done.split(",")) if done else set()
    return [(prefix + name, origin) for name, origin in complete_backend(last) if name not in chosen]


def complete_template(incomplete: str) -> Completion:
    """Built-in and user prompt templates."""
    try:
        from gptcli.templates import list_templates

        items = [(t.name, t.description or t.source) for t in list_templates()]
    except Exception:  # a broken user template must not break completion
        return []
    return _matching(items, incomplete)


def preset_dirs() -> list[Path]:
    """Where training presets live: gptcli/train/presets/ (found without importing gptcli.train)."""
    return [Path(__file__).resolve().parents[1] / "train" / "presets"]


def complete_preset(incomplete: str) -> Completion:
    """Training presets: the *.yaml names under gptcli/train/presets/."""
    items = [(p.stem, "training preset") for folder in preset_dirs() if folder.is_dir() for p in folder.glob("*.yaml")]
    return _matching(sorted(items), incomplete)


# Options shared by every command that runs a model. Defaults are None: "not given on the
# command line", so config files and the environment can supply the value.
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Catalogue alias, HF folder, .gguf file or hub id.", autocompletion=complete_model
    ),
]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", "-b", help="Backend name (see `gptcli backends`).", autocompletion=complete_backend),
]
TemplateOpt = Annotated[
    str | None,
    typer.Option(
        "--template", "-T", help="A prompt template (see `gptcli templates list`).", autocompletion=complete_template
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset", help="A training preset (a name from gptcli/train/presets).", autocompletion=complete_preset
    ),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda (auto = CUDA when present).")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16.")]
PrecisionOpt = Annotated[
    str | None, typer.Option("--precision", help="fp32 | fp16 | int8 | int4 (exported backends such as onnx).")
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads for the backend.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="A YAML config file (over the user config).")]
AllowPickleOpt = Annotated[
    bool | None, typer.Option("--allow-pickle", help="Allow pickled (.bin/.pt) weights. Only for trusted files.")
]
TrustRemoteCodeOpt = Annotated[
    bool | None, typer.Option("--trust-remote-code", help="Run model code shipped with the model folder.")
]
TemperatureOpt = Annotated[float | None, typer.Option("--temperature", "-t", help="0 = greedy.")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")]
MinPOpt = Annotated[float | None, typer.Option("--min-p", help="Drop tokens under min-p × the top probability.")]
RepetitionPenaltyOpt = Annotated[float | None, typer.Option("--repetition-penalty", help="1.0 = off.")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", "-n", help="Most new tokens to generate.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for reproducible sampling.")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this string (repeatable).")]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System message for chat models.")]
OverflowOpt = Annotated[
    str | None, typer.Option("--on-overflow", help="error | truncate: a prompt longer than the context.")
]


def resolve_settings_from(config_file: Path | None, params: dict[str, Any]) -> Any:
    """resolve_settings over a command's parameters: those named like a setting are its flags."""
    from gptcli.config import FIELDS

    names = {key.rsplit(".", 1)[-1] for key in FIELDS}
    return resolve_settings(config_file, **{k: v for k, v in params.items() if k in names})


def resolve_settings(config_file: Path | None, **flags: Any) -> Any:
    """Build Settings from all layers; flag names are Settings keys (sampling ones un-prefixed)."""
    from gptcli.config import FIELDS, resolve

    dotted: dict[str, Any] = {}
    for name, value in flags.items():
        key = name if name in FIELDS else f"sampling.{name}"
        if name == "stop" and value is not None:
            value = tuple(value) or None
        dotted[key] = value
    return resolve(config_file=config_file, flags=dotted)


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console() -> Any:
    """Tables on stdout: terminal width on a TTY; wide enough to never cut a path in a pipe."""
    from rich.console import Console

    piped = not sys.stdout.isatty()
    return Console(highlight=False, soft_wrap=True, width=240 if piped else None)


def note(message: str) -> None:
    """A progress or warning line on stderr (model text never goes through here)."""
    stderr_console().print(message, markup=False, style="dim")


def warn(message: str) -> None:
    stderr_console().print(f"warning: {message}", markup=False, style="yellow")


def read_stdin_if_piped() -> str:
    stream = sys.stdin
    if stream is None or stream.closed:
        return ""
    try:
        if stream.isatty():
            return ""
    except (ValueError, OSError):
        return ""
    buffer = getattr(stream, "buffer", None)
    data = buffer.read() if buffer is not None else stream.read().encode("utf-8")
    return decode_text(data, "standard input")


def gather_prompt(argument: str | None, file: Path | None) -> str:
    """stdin first, then the file, then the argument, joined by blank lines. Empty is an error."""
    parts = [read_stdin_if_piped()]
    if file is not None:
        parts.append(read_text_file(file))
    if argument is not None:
        parts.append(argument)
    text = "\n\n".join(p.strip("\n") for p in parts if p.strip())
    if not text.strip():
        raise InputError("the prompt is empty", hint="give it as an argument, with -f FILE, or on stdin")
    return text


def debug_enabled() -> bool:
    return os.environ.get("GPTCLI_DEBUG", "") not in {"", "0", "false"}


class StageProgress:
    """Rich bars on stderr (a terminal only) for a core `progress(stage, done, total)` callback.

    One bar per stage; a stage gets its bar once it has run for `show_after` seconds, so quick steps
    show none. `transient` bars disappear when the work is done.
    """

    def __init__(self, *, enabled: bool = True, show_after: float = 0.0, transient: bool = True) -> None:
        self.console = stderr_console()
        self.enabled = enabled and self.console.is_terminal
        self.show_after = show_after
        self.transient = transient
        self.progress: Any = None
        self.started: dict[str, float] = {}
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        started = self.started.setdefault(stage, now)
        if stage not in self.tasks:
            if now - started < self.show_after:
                return
            self.tasks[stage] = self._bars().add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)

    def _bars(self) -> Any:
        if self.progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=self.transient,
            )
            self.progress.start()
        return self.progress
