"""`gptcli config show|path|init`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gptcli.cli import common as c
from gptcli.cli.helpfmt import HelpGroup
from gptcli.cli.render import add_row, stdout_console
from gptcli.cli.settings import resolve_settings

app = typer.Typer(
    help="Show the resolved configuration, or write a commented config file.",
    no_args_is_help=True,
    cls=HelpGroup,
    rich_markup_mode=None,
)


@app.command()
def show(
    config: c.ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every setting, its resolved value and where it came from (default, file, $GPTCLI_*, flag).

    Example: gptcli config show --config my.yaml
    """
    resolved = resolve_settings(config)
    rows = resolved.rows()
    looked = looked_for(config)
    if as_json:  # the JSON stays a mapping of settings; the files go to stderr
        for line in looked:
            c.note(line)
        print(json.dumps({k: {"value": v, "source": s} for k, v, s in rows}, indent=2))
        return
    print("\n".join(looked), end="\n\n")
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("key", "value", "source"):
        table.add_column(column)
    for key, value, source in rows:
        add_row(table, key, json.dumps(value) if not isinstance(value, str) else value, source)
    stdout_console().print(table)


@app.command()
def path() -> None:
    """Print where the user config file is read from.

    Example: gptcli config path
    """
    from gptcli.paths import user_config_file

    print(user_config_file())


def looked_for(config: Path | None) -> list[str]:
    """Where settings were looked for, lowest precedence first, and whether each file exists."""
    from gptcli.config import FIELDS
    from gptcli.paths import user_config_file

    user = user_config_file()
    lines = ["config files, lowest precedence first:", f"  user      {user} ({_exists(user)})"]
    if config is not None:
        lines.append(f"  --config  {config} ({_exists(config)})")
    environ = __import__("os").environ
    env = sorted(spec.env for spec in FIELDS.values() if environ.get(spec.env))  # empty counts as not set
    lines.append(f"environment: {', '.join(env) if env else 'no GPTCLI_* setting'}")
    return lines


def _exists(path: Path) -> str:
    return "found" if path.exists() else "not found"  # a pipe too (<(…), /dev/stdin); a folder stopped it before


@app.command()
def init(
    target: Annotated[
        Path | None,
        c.path_argument("Where to write it (default: the user config file; - prints it).", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a file that is already there.")] = False,
) -> None:
    """Write a config file with every key, its default and what it does, all commented out.

    Uncomment a line to change that setting. Refuses to replace an existing file without --force.

    Examples:
      gptcli config init
      gptcli config init ./project.yaml && gptcli generate -c ./project.yaml "hi"
      gptcli config init - | less   # print it instead
    """
    from gptcli.atomicio import write_atomic
    from gptcli.errors import InputError
    from gptcli.paths import user_config_file

    if str(target) == "-":  # stdout, as `-` means elsewhere (it wrote a file named "-")
        sys.stdout.write(commented_config())
        return
    path = target if target is not None else user_config_file()
    if path.is_dir():
        raise InputError(f"{path} is a folder", hint="give a file name, e.g. config.yaml")
    exists = InputError(f"{path} already exists", hint="add --force to replace it")
    if path.exists() and not force:
        raise exists
    try:  # exclusive: a file another process made since the check above is not replaced either
        write_atomic(path, commented_config(), exclusive=not force)
    except FileExistsError:
        raise exists from None
    c.note(f"wrote {path}")


def commented_config() -> str:
    """Every setting with its default, flag, environment variable and meaning, commented out (valid YAML)."""
    from gptcli.config import FIELDS, Settings, get_value

    defaults = Settings()
    lines = [
        "# gptcli settings, written by `gptcli config init`: every key with its default, commented out.",
        "# Uncomment a line to change it. Precedence, lowest first: defaults < the user config file <",
        "# --config FILE < GPTCLI_* environment variables < flags. `gptcli config show` says what each",
        "# setting resolves to and where it came from.",
    ]
    section = ""
    for key, spec in FIELDS.items():
        head, _, name = key.rpartition(".")
        if head != section:
            lines += ["", f"{head}:"]  # a section whose keys are all commented out reads as empty: allowed
            section = head
        indent = "  " if head else ""
        value = _yaml_value(get_value(defaults, key))
        allowed = " | ".join(spec.choices) if spec.choices else spec.expect
        about = f"{KEY_HELP[key]}{f': {allowed}' if allowed else ''}"
        lines += ["", f"{indent}# {about}", f"{indent}# {name}: {value}".ljust(30) + f"  # {spec.flag}, ${spec.env}"]
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True)
    return text.removesuffix("...\n").strip()


KEY_HELP = {
    "model": "catalogue alias, HF folder, .gguf file or hub id",
    "backend": "which backend runs the model (`gptcli backends`)",
    "device": "where it runs (auto = CUDA when present)",
    "dtype": "weight and compute type of the torch backend",
    "precision": "weight precision (onnx: all; torch: fp32, int8, int4 on the CPU)",
    "threads": "CPU threads for the backend (null: the backend decides)",
    "on_overflow": "a prompt longer than the context: fail, or keep its end",
    "system": "system message for chat models",
    "chat_template": "a chat template rendered in place of the model's own (null: the model's)",
    "allow_pickle": "load pickled (.bin/.pt) weights; only for files you trust",
    "trust_remote_code": "run model code shipped with a model folder",
    "sampling.temperature": "0 = greedy",
    "sampling.top_k": "keep the k most likely tokens",  # its range says 0 turns it off
    "sampling.top_p": "nucleus sampling mass",
    "sampling.min_p": "drop tokens under min_p x the top probability",
    "sampling.repetition_penalty": "1.0 = off",
    "sampling.frequency_penalty": "OpenAI's: minus this x a token's count in the reply (0 = off)",
    "sampling.presence_penalty": "OpenAI's: minus this from tokens already in the reply (0 = off)",
    "sampling.max_tokens": "most new tokens per reply",
    "sampling.seed": "seed for reproducible sampling (null: a new one each run)",
    "sampling.stop": "stop at any of these strings",
    "sampling.repetition_stop": "end a reply that only repeats itself",
    "sampling.ignore_eos": "go on past end-of-sequence (benchmarks)",
}
