"""From a command's flags to Settings: each command names its flags explicitly, this resolves every layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def resolve_settings(config_file: Path | None, **flags: Any) -> Any:
    """Build Settings from all layers; flag names are Settings keys (sampling ones un-prefixed).

    A flag left at None was not given, so config files and the environment may supply the value.
    """
    from gptcli.config import FIELDS, resolve
    from gptcli.errors import ConfigError

    if config_file is not None and config_file.name.isdigit() and not config_file.exists():  # `-c 4096`
        raise ConfigError(
            f"config file not found: {config_file}",
            hint="-c is --config, a YAML file (not llama.cpp's context size: gptcli uses the model's whole context)",
        )
    dotted: dict[str, Any] = {}
    for name, value in flags.items():
        key = name if name in FIELDS else f"sampling.{name}"
        if key not in FIELDS:
            raise TypeError(f"resolve_settings: no setting named {name!r}")
        if name == "stop" and value is not None:
            value = tuple(value) or None
        if isinstance(value, Path):  # --chat-template: a setting holds the path as text, as a config file does
            value = str(value)
        dotted[key] = value
    return resolve(config_file=config_file, flags=dotted)


def output_constraint(
    json_schema: Path | None, output_format: str | None, regex: str | None, url: str | None, grammar: Path | None = None
) -> Any:
    """--json-schema / --format / --regex / --grammar as a checked `OutputConstraint` (or None), before any model
    loads."""
    from gptcli.errors import UsageError
    from gptcli.output_requests import from_flags

    constraint = from_flags(json_schema, output_format, regex, grammar)
    if constraint is not None and constraint.kind in ("regex", "grammar") and url is not None:
        raise UsageError(
            f"--{constraint.kind} does not work with --url: OpenAI's API has no {constraint.kind} format",
            hint="use --json-schema or --format json there, or drop --url to run the model here",
        )
    return constraint


def constrain(settings: Any, constraint: Any) -> Any:
    """Settings whose sampling carries the structured-output constraint (unchanged when there is none)."""
    if constraint is None:
        return settings
    from gptcli.config import with_output

    if any(settings.sampling.stop):
        from gptcli.cli import render

        render.warn("stop strings are ignored with structured output: it ends where its grammar does")
    return with_output(settings, constraint)
