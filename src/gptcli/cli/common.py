"""The command-line options shared by commands, and the shell completion of their values.

Settings resolution is in `cli.settings`, rendering in `cli.render`, input reading in `cli.inputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

# Re-exported for the commands that still reach them through `common` (train, bench, export, models, backends).
from gptcli.cli.render import StageProgress, note, stderr_console, stdout_console, warn
from gptcli.cli.settings import resolve_settings
from gptcli.textio import read_text_file

__all__ = ["StageProgress", "note", "read_text_file", "resolve_settings", "stderr_console", "stdout_console", "warn"]


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


def complete_choices(key: str) -> Callable[[str], Completion]:
    """For a setting with fixed choices (`--device` → auto, cpu, cuda), from its one definition in config."""

    def complete(incomplete: str) -> Completion:
        from gptcli.config import FIELDS

        return _matching([(choice, "") for choice in FIELDS[key].choices], incomplete)

    return complete


def given_options(ctx: typer.Context) -> list[str]:
    """The options typed on this command line (not defaults), each as its help names it: `-p/--n-prompt`."""
    params = ctx.command.params
    typed = [p for p in params if p.name and ctx.get_parameter_source(p.name).name == "COMMANDLINE"]
    return ["/".join(sorted(p.opts, key=len)) for p in typed if p.opts and p.opts[0].startswith("-")]


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
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device", help="auto | cpu | cuda (auto = CUDA when present).", autocompletion=complete_choices("device")
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="auto | float32 | bfloat16 | float16.", autocompletion=complete_choices("dtype")),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="fp32 | fp16 | int8 | int4 (onnx: all; torch: fp32, int8, int4 on the CPU).",
        autocompletion=complete_choices("precision"),
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads for the backend.")]
ParallelOpt = Annotated[
    int | None, typer.Option("--parallel", "-P", help="Sequences decoded together in one step (default: 8).", min=1)
]
KvBudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-budget",
        help="KV cache for all sequences: tokens (16384) or a size (512MiB); default: half the free memory.",
    ),
]


def _nonempty(fix: str, what: str = "path", make: Callable[[str], Any] = Path) -> Callable[[Any], Any]:
    """A parser that refuses an empty value as a usage error naming `fix`: a path (`--data "$DIR"`, DIR unset;
    Path("") is the current folder, which `train` would have read as its corpus or written its run into), or a
    model name (`models info "$NAME"`: `models info ''` showed the default model). A default is parsed too: a
    Path (`runs list`'s ./runs) passes as it is."""

    def parse(value: Any) -> Any:
        if isinstance(value, Path):
            return value
        if not value.strip():
            raise typer.BadParameter(f"an empty {what} ({fix})")
        return make(value)

    return parse


nonempty_path = _nonempty("to mean this folder, give '.'")  # a path that may name a folder
nonempty_file = _nonempty("give a file")


nonempty_id = _nonempty("give an id or a unique start of one: `gptcli chats list` shows them", "conversation id", str)


def nonempty_model(fix: str) -> Callable[[Any], Any]:
    """A model reference's parser (_nonempty) that refuses an empty one, naming `fix`."""
    return _nonempty(fix, "model name", str)


def path_option(*names: str, help: str, folder: bool = False) -> Any:
    """A typer.Option for a path that refuses an empty one: a file's (nonempty_file), or one that may name a folder
    (nonempty_path)."""
    return typer.Option(*names, parser=nonempty_path if folder else nonempty_file, metavar="<path>", help=help)


def path_argument(help: str, *, folder: bool = False, **options: Any) -> Any:
    """A typer.Argument for a path that refuses an empty one, as path_option."""
    return typer.Argument(parser=nonempty_path if folder else nonempty_file, help=help, **options)


ConfigOpt = Annotated[Path | None, path_option("--config", "-c", help="A YAML config file (over the user config).")]


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
FrequencyPenaltyOpt = Annotated[
    float | None, typer.Option("--frequency-penalty", help="Lower a token by this × its count so far (-2..2).")
]
PresencePenaltyOpt = Annotated[
    float | None, typer.Option("--presence-penalty", help="Lower every token used so far by this (-2..2).")
]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", "-n", help="Most new tokens to generate.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for reproducible sampling.")]
RepetitionStopOpt = Annotated[
    bool | None,
    typer.Option("--repetition-stop/--no-repetition-stop", help="End a reply that only repeats itself (default on)."),
]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this string (repeatable).")]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System message for chat models.")]
ChatTemplateOpt = Annotated[
    Path | None,
    path_option("--chat-template", help="A Jinja chat template file, rendered in place of the model's own."),
]
OverflowOpt = Annotated[
    str | None, typer.Option("--on-overflow", help="error | truncate: a prompt longer than the context.")
]
# Client mode: the model runs on an OpenAI-compatible server (gptcli serve, llama-server, ollama, vLLM).
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Run on an OpenAI-compatible server at this base URL (…/v1); -m names its model.",
        show_default=False,
    ),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="OPENAI_API_KEY",
        help="With --url: the server's key (gptcli serve --api-key).",
        show_default=False,
    ),
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        help="With --url: seconds to wait for an answer, or for each line of a streamed one (default 600).",
        show_default=False,
    ),
]
# Structured output (generate, chat): at most one of the four; the reply is constrained token by token.
JsonSchemaOpt = Annotated[
    Path | None,
    path_option("--json-schema", help="Make the output JSON that validates against this JSON Schema file."),
]
FormatOpt = Annotated[str | None, typer.Option("--format", help="json: the output is valid JSON (text: free text).")]
RegexOpt = Annotated[str | None, typer.Option("--regex", help="Make the output match this regular expression.")]
GrammarOpt = Annotated[
    Path | None,
    path_option("--grammar", help="Make the output match this grammar file: llama.cpp's GBNF or Lark (llguidance)."),
]
