"""The sandbox chat templates render in: transformers' (jinja2's immutable sandbox, trim and lstrip blocks, loop
controls, tojson, raise_exception, strftime_now), with what one render may make and run bounded.

A template is code: `{{ 'x' * 10**9 }}`, a loop doubling a string with `~`, `'a'.ljust(10**9)` or two nested
`range(100000)` loops would take the memory or the time of the process (a server's, for every client). Every way a
template builds a value is checked before the value is made: a text at most as long as a render may be, a
repetition at most MAX_REPEATED items; lines of template code are counted (render_bounded).
"""

from __future__ import annotations

import json
import re
import string
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from gptcli.errors import ChatTemplateRefusal
from gptcli.textio import PROMPT, MiB

MAX_RENDERED = PROMPT.max_bytes  # characters out, and in any text a template builds: no more than a prompt may hold
MAX_REPEATED = 1 * MiB  # characters or items one `*` may make (and items a list filter may pad or cut to)
MAX_TEMPLATE_LINES = 2_000_000  # lines of the template's code run (~1 s): loops bounded by count, not by a clock
MAX_JSON_INDENT = 64  # tojson's indent: spaces per level of every line
PADDING_METHODS = ("ljust", "rjust", "center", "zfill")
# printf-style conversions (`'%10s' % x`, the `format` filter): their widths and precisions, given or taken (`*`)
PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


class TemplateTooCostly(Exception):
    """A chat template's render went past one of the bounds above."""


def _check_text(length: int, what: str) -> None:
    if length > MAX_RENDERED:
        raise TemplateTooCostly(f"{what} of {length:,} characters, over {MAX_RENDERED:,}")


def _check_width(width: Any, what: str) -> None:
    if isinstance(width, int) and width > MAX_RENDERED:
        raise TemplateTooCostly(f"{what} {width:,} wide, over {MAX_RENDERED:,}")


def _check_printf(text: str, values: Any) -> None:
    """`text % values`: no width or precision past MAX_RENDERED, written in the text or taken from the values."""
    for spec in PRINTF_SPEC.finditer(text):
        for number in spec.groups():
            if number == "*":
                for value in values if isinstance(values, tuple) else (values,):
                    _check_width(value, "a formatted field")
            elif number is not None:
                _check_width(int(number), "a formatted field")


def _check_format(text: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """`text.format(...)`: no width or precision past MAX_RENDERED in its fields' specs (or in the values a nested
    spec such as `{:{w}}` takes)."""
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError:
        return  # str.format says what is wrong with it
    for _, _, spec, _ in fields:
        for number in re.findall(r"\d+", spec or ""):
            _check_width(int(number), "a formatted field")
        if spec and "{" in spec:
            for value in (*args, *kwargs.values()):
                _check_width(value, "a formatted field")


def _check_str_method(text: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A str method a template calls, before it runs: what it would make is not past MAX_RENDERED."""
    if name in PADDING_METHODS:
        _check_width(args[0] if args else kwargs.get("width"), f"a {name}")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _check_text(len(text) + text.count("\t") * max(size, 0), "an expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        count = text.count(old) if old else len(text) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            count = min(count, args[2])
        _check_text(len(text) + count * (len(new) - len(old)), "a replace")
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        parts = args[0]
        _check_text(len(text) * max(len(parts) - 1, 0) + sum(len(str(p)) for p in parts), "a join")
    elif name in ("format", "format_map"):
        _check_format(text, args, kwargs if name == "format" else (args[0] if args else {}))


def _joined(parts: Iterable[str], too_long: Callable[[int], str]) -> str:
    """`parts` joined, stopped (TemplateTooCostly, saying too_long(length so far)) once they pass MAX_RENDERED."""
    pieces, size = [], 0
    for piece in parts:
        size += len(piece)
        if size > MAX_RENDERED:
            raise TemplateTooCostly(too_long(size))
        pieces.append(piece)
    return "".join(pieces)


def _checked(original: Callable[..., Any], check: Callable[..., None]) -> Callable[..., Any]:
    """A jinja2 filter that calls check(value, *args, **kwargs) before `original`; an eval context or environment
    the filter takes first is passed through to it, not to the check."""
    passes = getattr(original, "jinja_pass_arg", None)

    def bounded(*args: Any, **kwargs: Any) -> Any:
        check(*(args[1:] if passes is not None else args), **kwargs)
        return original(*args, **kwargs)

    if passes is not None:
        bounded.jinja_pass_arg = passes  # type: ignore[attr-defined]
    return bounded


def _over_repeated(count: Any, what: str) -> None:
    if isinstance(count, int) and count > MAX_REPEATED:
        raise TemplateTooCostly(f"{what} of {count:,} items, over {MAX_REPEATED:,}")


def _check_indent(value: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    text, pad = str(value), width if isinstance(width, int) else len(str(width))
    _check_text(len(text) + (text.count("\n") + 1) * pad, "an indent")


def _check_join(value: Any, d: Any = "", attribute: Any = None) -> None:
    if isinstance(value, (list, tuple)) and attribute is None:
        _check_str_method(str(d), "join", (value,), {})


def _check_replace(value: Any, old: Any, new: Any, count: Any = None) -> None:
    _check_str_method(str(value), "replace", (str(old), str(new), *([count] if count is not None else [])), {})


FILTER_CHECKS: dict[str, Callable[..., None]] = {  # jinja2's filters that can make far more than they are given
    "center": lambda value, width=80, *_, **__: _check_width(width, "a center"),
    "indent": _check_indent,
    "join": _check_join,
    "replace": _check_replace,
    "batch": lambda value, linecount, *_, **__: _over_repeated(linecount, "a batch"),
    "slice": lambda value, slices, *_, **__: _over_repeated(slices, "a slice into parts"),
    "format": lambda value, *args, **kwargs: _check_printf(str(value), kwargs or args),
}


def template_environment(source: Path) -> Any:
    """The sandboxed jinja2 environment chat templates render in, as transformers renders them; `source` names the
    template in its errors. What a template builds is bounded here, the whole render by render_bounded."""
    from jinja2.compiler import CodeGenerator, Frame
    from jinja2.ext import loopcontrols
    from jinja2.nodes import Concat
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node: Concat, frame: Frame) -> None:
            """`a ~ b` through the environment's concat (bounded), not jinja2's unbounded str_join."""
            if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
                return super().visit_Concat(node, frame)
            self.write("environment.concat(map(str, (")
            for argument in node.nodes:
                self.visit(argument, frame)
                self.write(", ")
            self.write(")))")
            return None

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"*", "+", "%"})

        def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]  # `~`, {% set %} blocks, macros
            return _joined(parts, lambda size: f"a text of {size:,} characters, over {MAX_RENDERED:,}")

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                count, seq = (left, right) if isinstance(left, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    _over_repeated(len(seq) * count, "a repetition")
            elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _check_text(len(left) + len(right), "a concatenation")
            elif operator == "%" and isinstance(left, str):
                _check_printf(left, right)
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
            """str.format and format_map come wrapped at access (jinja2's sandboxed formatter): checked there too."""
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            text, name = value.__self__, value.__name__

            def checked(*args: Any, **kwargs: Any) -> str:
                _check_str_method(text, name, args, kwargs)
                return wrapped(*args, **kwargs)

            return checked

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

    def raise_exception(message: str) -> None:
        raise ChatTemplateRefusal(f"{source}: chat template error: {message}")

    def tojson(
        value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        """transformers' tojson (its arguments in its order: no HTML escaping), its indent bounded."""
        width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        if width > MAX_JSON_INDENT:
            raise TemplateTooCostly(f"a tojson indent of {width:,}, over {MAX_JSON_INDENT}")
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters.update({name: _checked(env.filters[name], check) for name, check in FILTER_CHECKS.items()})
    env.filters["tojson"] = tojson
    env.globals.pop("lipsum", None)  # lipsum(n=10**9): no chat template writes placeholder text
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_bounded(template: Any, **variables: Any) -> str:
    """A compiled chat template's text; a TemplateTooCostly past MAX_RENDERED characters out or MAX_TEMPLATE_LINES
    lines of the template run (counted by a trace function on the template's own frames, this thread only)."""
    lines = 0

    def count_lines(frame: Any, event: str, arg: Any) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
            if lines > MAX_TEMPLATE_LINES:
                raise TemplateTooCostly(f"it ran over {MAX_TEMPLATE_LINES:,} lines of template code")
        return count_lines

    def template_frames(frame: Any, event: str, arg: Any) -> Any:
        return count_lines if frame.f_code.co_filename == "<template>" else None

    before = sys.gettrace()  # a debugger's or coverage's, given back after
    sys.settrace(template_frames)
    try:
        return _joined(template.generate(**variables), lambda _: f"it renders over {MAX_RENDERED:,} characters")
    finally:
        sys.settrace(before)
