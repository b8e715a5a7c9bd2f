"""Prompt templates: a system message, a user message with `{input}` and named variables, default sampling.

Built-ins live in `gptcli/templates_builtin/*.yaml`; user templates in `<config dir>/templates/*.yaml`
override a built-in of the same name. Everything is checked before any model is loaded.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gptcli.coercion import coerce_value, suggest
from gptcli.config import FIELDS, Resolved, Settings, coerce, flatten_file
from gptcli.errors import ConfigError, InputError, UsageError, clipped
from gptcli.paths import config_dir
from gptcli.textio import PROMPT, human_bytes, read_yaml

BUILTIN_DIR = Path(__file__).parent / "templates_builtin"
TEMPLATE_KEYS = ("description", "system", "user", "variables", "sampling")


def user_templates_dir() -> Path:
    return config_dir() / "templates"


def placeholders(text: str) -> list[str]:
    """The `{name}` placeholders of `text`; a format spec, a conversion, attribute or index access is refused.

    `str.format_map` checks names but obeys specs, so `{input:>2000000000}` would ask for gigabytes.
    Raises ValueError (unbalanced braces) or PlaceholderError.
    """
    names = []
    for _, name, spec, conversion in string.Formatter().parse(text):
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise PlaceholderError(f"{{{shown}}}")
        names.append(name)
    return names


class PlaceholderError(ValueError):
    """A placeholder that is more than a plain name (the message is the placeholder as written)."""


@dataclass(frozen=True)
class Template:
    """A named prompt. `variables` maps each name to its default (None: the user must give it)."""

    name: str
    user: str
    system: str | None = None
    description: str = ""
    variables: Mapping[str, str | None] = field(default_factory=dict)
    sampling: Mapping[str, Any] = field(default_factory=dict)
    source: str = "built-in"
    path: Path | None = None

    @property
    def fields(self) -> list[str]:
        """Every `{name}` used in the system and user text, in order of appearance."""
        names: dict[str, None] = {}  # ordered, and a set's lookups: a template may use thousands of names
        for text in (self.system or "", self.user):
            names.update(dict.fromkeys(placeholders(text)))
        return list(names)

    @property
    def required(self) -> list[str]:
        return [n for n in self.fields if n != "input" and self.variables.get(n) is None]

    def render(self, text: str, variables: Mapping[str, str] | None = None) -> tuple[str | None, str]:
        """(system, user) with `{input}` = text and the variables filled in."""
        values = self.bind(variables or {})
        values["input"] = text
        self._check_size(values)
        system = self.system.format_map(values) if self.system else None
        return system, self.user.format_map(values)

    def _check_size(self, values: Mapping[str, str]) -> None:
        """The prompt's size, counted before it is built: a template may use {input} thousands of times, and
        a 10 kB input then made gigabytes of prompt (an InputError over the prompt limit, exit 6)."""
        sizes = {name: len(value.encode("utf-8", "surrogatepass")) for name, value in values.items()}
        total = uses = 0
        for text in (self.system or "", self.user):
            for literal, name, _, _ in string.Formatter().parse(text):
                total += len(literal.encode("utf-8", "surrogatepass")) + (sizes[name] if name is not None else 0)
                uses += name == "input"
        if total > PROMPT.max_bytes:
            raise InputError(
                f"template '{self.name}' makes a prompt of {human_bytes(total)} from this input ({{input}} {uses} "
                f"time(s)): over the {PROMPT.label} limit for {PROMPT.kind}",
                hint=f"shorten the input, or use {{input}} fewer times in {self.path or 'the template'}",
            )

    def bind(self, given: Mapping[str, str]) -> dict[str, str]:
        """Defaults overlaid with the given variables; unknown or missing names are usage errors."""
        known = [n for n in self.fields if n != "input"]
        known_set = set(known)
        unknown = [k for k in given if k not in known_set]
        if unknown:
            listed = ", ".join(known) or "none"
            raise UsageError(
                f"template '{self.name}' has no variable '{unknown[0]}' (its variables: {listed})",
                hint=f"see `gptcli templates show {self.name}`",
            )
        values = {k: v for k, v in self.variables.items() if v is not None}
        values.update(given)
        blank = [n for n in self.required if n in given and not given[n].strip()]
        if blank:  # a required variable has no default to fall back on: empty would make a broken prompt
            raise UsageError(
                f"template '{self.name}' needs a value for '{blank[0]}', not an empty one",
                hint=f"pass --var {blank[0]}=VALUE",
            )
        missing = [n for n in known if n not in values]
        if missing:
            raise UsageError(
                f"template '{self.name}' needs the variable '{missing[0]}'",
                hint=f"pass --var {missing[0]}=VALUE",
            )
        return values

    def check_filled_by(self, command: str, filled: Mapping[str, str]) -> None:
        """For a command that fills only `filled` (no --var): every other variable needs a default, said
        as a config error naming the file, before any model loads."""
        missing = [name for name in self.required if name not in filled]
        if missing:
            where = self.path or f"the {self.source} template '{self.name}'"
            names = ", ".join(f"{{{name}}}" for name in filled)
            raise ConfigError(
                f"{where}: variables: '{missing[0]}' has no default, and `{command}` fills only {names}",
                hint=f"give it one in the template (variables: {missing[0]}: VALUE), or remove {{{missing[0]}}}",
            )

    def to_yaml_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"description": self.description}
        if self.system:
            data["system"] = self.system
        data["user"] = self.user
        if self.variables:
            data["variables"] = dict(self.variables)
        if self.sampling:
            data["sampling"] = dict(self.sampling)
        return data


def parse_template(name: str, data: Mapping[str, Any], where: str, source: str, path: Path | None) -> Template:
    """Validate a template mapping (as read from YAML); errors name the file and key."""
    for key in data:
        if key not in TEMPLATE_KEYS and key != "name":
            raise ConfigError(f"{where}: {key}: unknown template key (expected one of {', '.join(TEMPLATE_KEYS)})")
    user = data.get("user")
    if not isinstance(user, str) or not user.strip():
        raise ConfigError(f"{where}: user: a template needs a non-empty user message containing {{input}}")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"{where}: system: must be a string")
    variables = data.get("variables") or {}
    if not isinstance(variables, dict):
        raise ConfigError(f"{where}: variables: must be a mapping of name to default (null: required)")
    for key in variables:
        if not isinstance(key, str) or not key.isidentifier():  # YAML's `1:` or `yes:`: no {placeholder} names it
            raise ConfigError(
                f"{where}: variables: {key!r} is not a plain name, so no {{placeholder}} can use it",
                hint="name it with letters, digits and _ (not starting with a digit), e.g. topic",
            )
    variables = {k: _text(f"variables.{k}", v, where, k) for k, v in variables.items()}
    sampling_raw = data.get("sampling") or {}
    if not isinstance(sampling_raw, dict):
        raise ConfigError(f"{where}: sampling: must be a mapping")
    sampling = {
        dotted.removeprefix("sampling."): coerce(FIELDS[dotted], value, where, "file")
        for dotted, value in flatten_file({"sampling": sampling_raw}, where).items()
    }
    template = Template(
        name=name,
        user=user,
        system=system,
        description=_text("description", data.get("description"), where, "description") or "",
        variables=variables,
        sampling=sampling,
        source=source,
        path=path,
    )
    try:
        fields_used = template.fields
    except PlaceholderError as exc:
        raise ConfigError(
            f"{where}: invalid placeholder {exc}: placeholders are plain names",
            hint="write {name}, with no format spec (:...), conversion (!r), attribute or index",
        ) from None
    except ValueError as exc:  # unbalanced braces
        raise ConfigError(f"{where}: invalid placeholder: {exc}", hint="write a literal brace as {{ or }}") from None
    if "input" not in fields_used:
        raise ConfigError(f"{where}: user: the template never uses {{input}}")
    return template


def _text(key: str, value: Any, where: str, written: object) -> str | None:
    """A template's text value (a number reads as written); a list, mapping or YAML's yes/no is refused,
    never turned into "[1, 2]" or "True"."""
    return coerce_value(key, str | None, value, where, hint=f'write it as text in quotes ({written}: "...")')


def _load_file(path: Path, source: str) -> Template:
    return parse_template(path.stem, read_yaml(path, "template file"), str(path), source, path)


def list_templates(on_error: Callable[[ConfigError], None] | None = None) -> list[Template]:
    """Built-ins, then user templates (a user template replaces the built-in of the same name).

    A user template that does not load raises, or with `on_error` is reported to it and left out."""
    found: dict[str, Template] = {}
    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        found[path.stem] = _load_file(path, "built-in")
    for path in _user_entries():
        try:
            if _is_user_file(path):
                found[path.stem] = _load_file(path, "user")
        except ConfigError as exc:
            if on_error is None:
                raise
            on_error(exc)
    return list(found.values())


def _user_entries() -> list[Path]:
    """Every NAME.yaml in the user's templates folder, files or not (_is_user_file tells)."""
    folder = user_templates_dir()
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def _is_user_file(path: Path) -> bool:
    """Whether a user template's file is there. Something else by its name (a folder, a link to a missing
    file, a FIFO) is a ConfigError: skipped, the built-in of that name ran instead, or 'unknown template'."""
    if path.is_file():
        return True
    if not (path.exists() or path.is_symlink()):
        return False
    kind = "a folder" if path.is_dir() else "a link to a missing file" if not path.exists() else "a pipe or a device"
    raise ConfigError(
        f"the template {path} is {kind}, not a YAML file",
        hint="replace it with the template's file, or move it out of the templates folder",
    )


MAX_FILE_NAME = 255  # bytes in one file name on Linux, macOS and Windows file systems


def get_template(name: str) -> Template:
    if Path(name).name != name:  # './pirate' named templates/./pirate.yaml, never ./pirate.yaml here
        raise UsageError(
            f"'{name}' is a path: a template is named by its file NAME.yaml in {user_templates_dir()}",
            hint="put the file in that folder (`gptcli templates path`) and give its name",
        )
    if len(f"{name}.yaml".encode(errors="surrogateescape")) <= MAX_FILE_NAME:  # a longer name can be no file's
        user_file = user_templates_dir() / f"{name}.yaml"
        if _is_user_file(user_file):
            return _load_file(user_file, "user")
        builtin = BUILTIN_DIR / f"{name}.yaml"
        if builtin.is_file():
            return _load_file(builtin, "built-in")
    names = sorted({path.stem for path in [*BUILTIN_DIR.glob("*.yaml"), *(p for p in _user_entries() if p.is_file())]})
    raise UsageError(
        f"unknown template '{clipped(name)}'{suggest(name, names)}", hint="`gptcli templates list` shows them all"
    )


# generate's shorthands: a flag that sets one variable of a built-in template, and the template it implies
SHORTHANDS = (("to", "translate"), ("question", "qa"))


def with_shorthands(template: str | None, variables: list[str], **given: str | None) -> tuple[str | None, list[str]]:
    """The template and `--var`s after `--to` and `--question` (the translate and qa templates' variables): one
    template at a time, so not both (the second read as an unknown variable of the first)."""
    named = [(name, value, implied) for name, implied in SHORTHANDS if (value := given.get(name)) is not None]
    if len(named) > 1:
        raise UsageError("--to and --question ask for two templates (translate, qa)", hint="give one of them")
    for name, value, implied in named:
        variables, template = [*variables, f"{name}={value}"], template or implied
    return template, variables


def parse_vars(pairs: Sequence[str]) -> dict[str, str]:
    """`k=v` strings (from repeated --var) into a dict."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--var expects NAME=VALUE, got {pair!r}", hint="e.g. --var to=French")
        out[key] = value
    return out


def apply_sampling_defaults(resolved: Resolved, template: Template) -> Settings:
    """The template's sampling values replace only built-in defaults, never what the user set."""
    settings = resolved.settings
    changes = {k: v for k, v in template.sampling.items() if resolved.sources.get(f"sampling.{k}") == "default"}
    if not changes:
        return settings
    return replace(settings, sampling=replace(settings.sampling, **changes))
