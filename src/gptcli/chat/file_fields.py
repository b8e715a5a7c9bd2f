"""The fields of a saved chat file beside its messages, checked as they are read back: its `/set` sampling
changes, its output format, its chat template file."""

from __future__ import annotations

import json
from typing import Any

from gptcli.config import OutputConstraint
from gptcli.errors import ConfigError, InputError


def checked_sampling(sampling: Any, where: str) -> dict[str, Any]:
    """A saved chat's sampling settings, each checked as a config file's would be (a bad file is exit 6)."""
    from gptcli.config import Settings, with_sampling

    if not sampling:
        return {}
    if not isinstance(sampling, dict):
        raise InputError(f"{where}: 'sampling' must be a mapping of settings")
    try:
        with_sampling(Settings(), where.replace("{", "{{").replace("}", "}}"), **sampling)
    except ConfigError as exc:
        raise InputError(exc.message, hint="fix or remove that setting in the file") from None
    return dict(sampling)


OUTPUT_SHAPES = '{"format": "json"}, {"json_schema": {...}}, {"regex": "..."} or {"grammar": "..."}'


def output_to_json(constraint: OutputConstraint) -> dict[str, Any]:
    """The output format as a chat file keeps it, named as the flags are (OUTPUT_SHAPES)."""
    if constraint.kind == "json_schema":
        return {"json_schema": json.loads(constraint.source)}
    if constraint.kind in ("regex", "grammar"):
        return {constraint.kind: constraint.source}
    return {"format": "json"}


def output_from_json(value: Any, where: str) -> OutputConstraint | None:
    """A chat file's `output` (absent in files from before it was kept: free text). Its shape is checked
    here; the grammar is compiled when the chat is resumed or loaded (`chats list` stays quick)."""
    if value is None:
        return None
    kind = next(iter(value), None) if isinstance(value, dict) and len(value) == 1 else None
    item = value[kind] if kind is not None else None
    if kind == "format" and item == "json":
        return OutputConstraint("json")
    if kind in ("regex", "grammar") and isinstance(item, str) and item:
        return OutputConstraint(kind, item)
    if kind == "json_schema" and isinstance(item, dict):
        try:
            return OutputConstraint("json_schema", json.dumps(item, allow_nan=False))
        except ValueError:  # NaN: no JSON Schema
            pass
    hint = "fix or remove 'output' in the file (without it, replies are free text)"
    raise InputError(f"{where}: 'output' must be {OUTPUT_SHAPES}", hint=hint)


def checked_chat_template(value: Any, where: str) -> str | None:
    """A chat file's `chat_template`: the path of the --chat-template file it was held with (absent: the model's
    own). The file itself is read when the chat is resumed, as the flag's would be."""
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    raise InputError(f"{where}: 'chat_template' must be a file's path", hint="fix or remove it in the file")
