"""The one coercer: a raw value (YAML scalar, environment string, flag, `/set` text, batch-line value) into a
setting's type, and the one "did you mean" (`suggest`). gptcli.config builds its settings on them; the training
config and the prompt templates use them too.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from typing import Any

from gptcli.errors import ConfigError, clipped

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def env_switch(name: str, default: bool = True) -> bool:
    """An on/off environment variable (unset or empty: `default`). A value that is none of 1/0, true/false,
    yes/no, on/off is an error, not silently the default (`=of` would have kept it on)."""
    value = os.environ.get(name, "").strip().lower()
    if value and value not in TRUE_WORDS | FALSE_WORDS:
        raise ConfigError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {clipped(repr(value))}")
    return value in TRUE_WORDS if value else default


# How a value's expected type reads in an error ("must be a whole number, got 'x'").
KIND_NAMES: dict[type, str] = {
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    tuple: "a list of strings",
    str: "text",
}
OTHER_NAMES = {"gpu": "cuda", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "float16": "fp16"}  # choices'


def suggest(name: str, candidates: list[str]) -> str:
    """The one ` (did you mean 'x'?)`: the choice meant in any case or by another name (gpu), else the nearest."""
    folded = {candidate.casefold(): candidate for candidate in reversed(candidates)}  # the first spelling wins
    meant = OTHER_NAMES.get(name.casefold(), name.casefold())
    close = [meant] if meant in folded else difflib.get_close_matches(name.casefold(), list(folded), n=1)
    return f" (did you mean '{folded[close[0]]}'?)" if close else ""


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """`int | None` → (int, True); `tuple[str, ...]` → (tuple, False)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return _unwrap_optional(args[0])[0], True
    return typing.get_origin(kind) or kind, False


def coerce_value(
    key: str,
    kind: Any,
    value: Any,
    where: str,
    *,
    choices: tuple[str, ...] = (),
    hint: str | None = None,
) -> Any:
    """The one coercer: a raw value (YAML scalar, env string, flag, `/set` text) into the field's type.

    `kind` is a type hint (`int`, `float | None`, `tuple[str, ...]`); bools accept yes/no/on/off/1/0.
    """
    kind, optional = _unwrap_optional(kind)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {key} must not be empty", hint=hint)
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in TRUE_WORDS | FALSE_WORDS:
                    raise ValueError(value)
                value = lowered in TRUE_WORDS
            elif not isinstance(value, bool):
                raise ValueError(value)
        elif kind is tuple:
            if isinstance(value, str):
                value = (value,)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                value = tuple(value)
                "".join(value).encode("utf-8")
            else:
                raise ValueError(value)
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):  # nan, ±inf: no setting means them
                raise ConfigError(f"{where}: {key} must be a finite number, got {clipped(repr(value))}", hint=hint)
        elif kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            value = str(value)
            value.encode("utf-8")  # bytes from the command line that are not UTF-8 come as surrogates
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: {key} is not valid UTF-8 text", hint=hint) from None
    except (TypeError, ValueError):
        described = KIND_NAMES.get(kind, f"a {kind.__name__}")
        raise ConfigError(f"{where}: {key} must be {described}, got {clipped(repr(value))}", hint=hint) from None
    if choices and value not in choices:
        raise ConfigError(
            f"{where}: {key} must be one of {', '.join(choices)}, got {clipped(repr(value))}"
            + suggest(str(value), list(choices)),
            hint=hint,
        )
    return value
