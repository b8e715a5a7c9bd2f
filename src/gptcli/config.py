"""Settings: frozen dataclasses, one YAML loader, one precedence order, one place for validation.

This is also the one config engine: `flatten` (nested mapping → dotted keys over any dataclass),
`coerce_value` (a raw value → a field's type) and `suggest` (the "did you mean"; both from gptcli.coercion)
serve the settings, the training config (`gptcli.train.config`), `/set` in chat and the prompt templates.

Precedence, lowest first: built-in defaults < user config file < ``--config FILE`` < ``GPTCLI_*``
environment variables < command-line flags. Every resolved value remembers where it came from so
``gptcli config show`` can say so.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from gptcli.coercion import coerce_value, suggest
from gptcli.errors import ConfigError, clipped
from gptcli.paths import user_config_file
from gptcli.textio import read_yaml

DEFAULT_MODEL = "smollm2-135m-instruct"
# The most CPU threads any command takes: past the machine's cores more only slow a step down, and a
# runaway value (100000) once spent minutes and 16 GB creating threads before the first token.
MAX_THREADS = 1024


@dataclass(frozen=True)
class OutputConstraint:
    """Structured output (JSON, a JSON Schema or a regex), set per run or request: `gptcli.constraints` compiles it."""

    kind: str  # "json" | "json_schema" | "regex" | "grammar"
    source: str = ""
    where: str = field(default="", compare=False)  # what asked for it (`--regex`, a flag's file), for later errors


# The numeric sampling settings a single request may set (a batch-file line, a server request), by name.
SAMPLING_KNOBS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)


@dataclass(frozen=True)
class SamplingConfig:
    """How the decoding loop picks tokens. temperature 0 means greedy."""

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's: minus this x each token's count in the reply so far
    presence_penalty: float = 0.0  # OpenAI's: minus this from every token already in the reply
    max_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_stop: bool = True  # end a reply that only repeats itself (finish reason "repetition")
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks: exactly max_tokens tokens)
    constraint: OutputConstraint | None = None  # structured output; not a config-file setting (no FieldSpec)
    # Per request (the server, batch files), not config-file settings either:
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI's logit_bias
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: off)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (echo with logprobs)
    # vLLM's stopping options, per request too (gptcli.stopping checks them):
    min_tokens: int = 0  # end-of-sequence, stop_token_ids and stop strings wait until this many tokens
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the reply as end-of-sequence does
    include_stop_str_in_output: bool = False  # the stop string (or stop token) that ends the reply stays in its text
    # The reply continues the prompt's text (a raw completion, an assistant's message continued), so it is decoded
    # after the prompt's last tokens: its first word keeps its space on sentencepiece tokenizers. A new chat turn's
    # reply reads alone (the prompt ends with the template's generation prompt). Set where the prompt is built.
    continues_prompt: bool = False


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to pick a model and backend and run the decoding loop."""

    model: str = DEFAULT_MODEL
    backend: str = "torch"
    device: str = "auto"
    dtype: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    on_overflow: str = "error"
    system: str | None = None
    chat_template: str | None = None  # a Jinja file rendered in place of the model's chat template
    allow_pickle: bool = False
    trust_remote_code: bool = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


# Each stop string is looked for after every token: thousands of them (a 3.5 MB batch line) made a token cost 0.5 s.
MAX_STOP_STRINGS = 16  # vLLM takes any number, OpenAI 4


@dataclass(frozen=True)
class FieldSpec:
    """One setting: its dotted key, type, range check, and the flag/env var that set it."""

    key: str
    kind: type
    flag: str
    check: Callable[[Any], bool] | None = None
    expect: str = ""
    choices: tuple[str, ...] = ()
    optional: bool = False

    @property
    def env(self) -> str:
        return "GPTCLI_" + self.key.split(".")[-1].upper()


FIELDS: dict[str, FieldSpec] = {
    spec.key: spec
    for spec in [
        FieldSpec("model", str, "--model", lambda v: bool(v.strip()), "a model name, folder or file"),
        FieldSpec("backend", str, "--backend"),
        FieldSpec("device", str, "--device", choices=("auto", "cpu", "cuda")),
        FieldSpec("dtype", str, "--dtype", choices=("auto", "float32", "bfloat16", "float16")),
        FieldSpec("precision", str, "--precision", choices=("fp32", "fp16", "int8", "int4")),
        FieldSpec("threads", int, "--threads", lambda v: 1 <= v <= MAX_THREADS, f"in 1..{MAX_THREADS}", optional=True),
        FieldSpec("on_overflow", str, "--on-overflow", choices=("error", "truncate")),
        FieldSpec("system", str, "--system", optional=True),
        FieldSpec(
            "chat_template", str, "--chat-template", lambda v: bool(v.strip()), "a Jinja file's path", optional=True
        ),
        FieldSpec("allow_pickle", bool, "--allow-pickle"),
        FieldSpec("trust_remote_code", bool, "--trust-remote-code"),
        FieldSpec("sampling.temperature", float, "--temperature", lambda v: v >= 0, ">= 0"),
        FieldSpec("sampling.top_k", int, "--top-k", lambda v: v >= -1, ">= -1 (0 or -1, vLLM's, turns it off)"),
        FieldSpec("sampling.top_p", float, "--top-p", lambda v: 0 < v <= 1, "in (0, 1]"),
        FieldSpec(
            "sampling.min_p", float, "--min-p", lambda v: 0 <= v <= 1, "in [0, 1] (1: the likeliest token alone)"
        ),
        FieldSpec("sampling.repetition_penalty", float, "--repetition-penalty", lambda v: v > 0, "> 0"),
        FieldSpec("sampling.frequency_penalty", float, "--frequency-penalty", lambda v: -2 <= v <= 2, "in [-2, 2]"),
        FieldSpec("sampling.presence_penalty", float, "--presence-penalty", lambda v: -2 <= v <= 2, "in [-2, 2]"),
        FieldSpec("sampling.max_tokens", int, "--max-tokens", lambda v: v >= 1, ">= 1"),
        FieldSpec("sampling.seed", int, "--seed", lambda v: 0 <= v < 2**63, "in [0, 2**63)", optional=True),
        FieldSpec(
            "sampling.stop",
            tuple,
            "--stop",
            lambda v: len(v) <= MAX_STOP_STRINGS,
            f"at most {MAX_STOP_STRINGS} strings",
        ),
        FieldSpec("sampling.repetition_stop", bool, "--no-repetition-stop"),
        FieldSpec("sampling.ignore_eos", bool, "--ignore-eos"),
    ]
}


@dataclass(frozen=True)
class Resolved:
    """The settings plus, for each dotted key, where its value came from."""

    settings: Settings
    sources: Mapping[str, str]

    def rows(self) -> list[tuple[str, Any, str]]:
        return [(key, get_value(self.settings, key), self.sources[key]) for key in FIELDS]


def get_value(settings: Settings, key: str) -> Any:
    obj: Any = settings
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field names and their resolved type hints."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def coerce(spec: FieldSpec, value: Any, where: str, origin: str = "flag") -> Any:
    """A raw value into the setting's type and range; a hint names where to fix it (`origin`: flag, env, file)."""
    place = {"env": f"environment variable {spec.env}", "file": f"config key {spec.key}"}.get(origin)
    long_hint = place or f"flag {spec.flag}, config key {spec.key}"
    if value is None and not spec.optional:
        raise ConfigError(f"{where}: {spec.key} must not be empty", hint=f"set it with {place or spec.flag}")
    if value is None:
        return None
    value = coerce_value(spec.key, spec.kind, value, where, hint=place or f"flag {spec.flag}")
    if spec.choices:
        value = coerce_value(spec.key, spec.kind, value, where, choices=spec.choices, hint=long_hint)
    if spec.check is not None and not spec.check(value):
        raise ConfigError(f"{where}: {spec.key} must be {spec.expect}, got {clipped(repr(value))}", hint=long_hint)
    return value


def flatten(data: Mapping[str, Any], cls: type, where: str) -> dict[str, Any]:
    """A config file's nested mapping → dotted keys, checked against the dataclass `cls`.

    A field whose type is a dataclass is a section (`sampling:`, `optim:`). Unknown keys fail with the
    file, the key path and a suggestion; a section key written at the top level points at its section.
    """
    flat: dict[str, Any] = {}
    top = field_types(cls)
    for key, value in data.items():
        key = str(key)
        if key not in top:
            # A section's key at the top level, as written or misspelt: point at it in its section.
            inside = {f"{s} -> {k}": k for s, t in top.items() if is_dataclass(t) for k in field_types(t)}
            nested = [path for path, k in inside.items() if k == key]
            if not nested:  # the closest name of all, top-level or in a section ('temprature': temperature's)
                closest = difflib.get_close_matches(key, [*top, *inside.values()], n=1)
                nested = [name for name in closest if name in top] or [p for p, k in inside.items() if k in closest]
            hint = f" (did you mean '{nested[0]}'?)" if nested else ""
            raise ConfigError(f"{where}: {key}: unknown key{hint}")
        kind = top[key]
        if not is_dataclass(kind):
            flat[key] = value
            continue
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {key}: must be a mapping")
        section = field_types(kind)
        for sub, sub_value in value.items():
            if sub not in section:
                raise ConfigError(f"{where}: {key} -> {sub}: unknown key{suggest(str(sub), list(section))}")
            flat[f"{key}.{sub}"] = sub_value
    return flat


def flatten_file(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A settings file's nested keys as dotted keys (unknown ones fail with a suggestion); a sampling field
    that is a per-request option (logprobs, logit_bias, a constraint) is not a setting a file can hold."""
    flat = flatten(data, Settings, where)
    for key in flat:
        if key not in FIELDS:
            section, name = key.split(".", 1) if "." in key else ("", key)
            settable = [f.split(".", 1)[-1] for f in FIELDS if f.startswith(f"{section}.")]
            raise ConfigError(f"{where}: {section} -> {name}: unknown key{suggest(name, settable)}")
    return flat


def resolve(
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    user_file: Path | None = None,
) -> Resolved:
    """Resolve settings from every layer, in precedence order."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    defaults = Settings()
    for key in FIELDS:
        values[key] = get_value(defaults, key)
        sources[key] = "default"

    layers: list[tuple[str, dict[str, Any]]] = []
    user_file = user_config_file() if user_file is None else user_file
    if user_file.is_dir():  # not a missing file: skipping it ran with settings other than the user meant
        raise ConfigError(
            f"the user config file {user_file} is a folder, not a file",
            hint="remove or rename that folder; `gptcli config init` writes the file there",
        )
    if user_file.is_file():
        layers.append((str(user_file), flatten_file(read_yaml(user_file), str(user_file))))
    if config_file is not None:
        layers.append((str(config_file), flatten_file(read_yaml(config_file), str(config_file))))
    env_layer = {}
    for key, spec in FIELDS.items():
        if environ.get(spec.env):  # set and not empty: `GPTCLI_THREADS= gptcli …` means "not set", as in a shell
            raw: Any = environ[spec.env]
            if spec.kind is tuple:
                raw = tuple(s for s in raw.split(",") if s)
            env_layer[key] = raw
    layers.append(("env", env_layer))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if v is not None}))

    for source, layer in layers:
        for key, raw in layer.items():
            spec = FIELDS[key]
            where = f"${spec.env}" if source == "env" else (spec.flag if source == "flag" else source)
            values[key] = coerce(spec, raw, where, source if source in ("env", "flag") else "file")
            sources[key] = f"${spec.env}" if source == "env" else source

    sampling = SamplingConfig(
        **{f.name: values[f"sampling.{f.name}"] for f in fields(SamplingConfig) if f"sampling.{f.name}" in FIELDS}
    )
    top = {f.name: values[f.name] for f in fields(Settings) if f.name != "sampling"}
    return Resolved(Settings(**top, sampling=sampling), sources)


def with_drawn_seed(settings: Settings) -> Settings:
    """Settings with a seed: the given one, else a random one drawn now (reported, so any run can be repeated)."""
    import secrets

    if settings.sampling.seed is not None:
        return settings
    return replace(settings, sampling=replace(settings.sampling, seed=secrets.randbelow(2**31)))


def with_output(settings: Settings, constraint: OutputConstraint | None) -> Settings:
    """A copy of settings whose replies follow `constraint` (None: free text)."""
    return replace(settings, sampling=replace(settings.sampling, constraint=constraint))


def with_sampling(settings: Settings, where: str = "{flag}", **changes: Any) -> Settings:
    """A copy of settings with some sampling values changed (validated like any other layer).

    `where` names the source in an error, formatted with the value's `key` and `flag` (a flag by default; a
    batch line says "the line", not the command-line flag it did not use); the error names the setting
    itself (`sampling.temperature must be ...`), so a source such as a file, a line or /set need not."""
    checked = {}
    for key, value in changes.items():
        spec = FIELDS.get(f"sampling.{key}")
        if spec is None:
            settable = [name.split(".", 1)[1] for name in FIELDS if name.startswith("sampling.")]
            raise ConfigError(
                f"{where.format(key=key, flag=key)}: sampling.{key}: unknown sampling setting"
                + suggest(str(key), settable)
            )
        checked[key] = coerce(spec, value, where.format(key=key, flag=spec.flag))
    return replace(settings, sampling=replace(settings.sampling, **checked))
