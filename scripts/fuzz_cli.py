"""A seeded mutation fuzzer for the command line: every command's flags, files, stdin, environment and config.

    .venv/bin/python scripts/fuzz_cli.py --cases 3000 --seed 1

It starts from valid invocations of every command (generate, chat, summarize, bench, train, eval, export, models,
chats, runs, config, templates, backends; serve only with --help: no server starts) over the test suite's tiny
random-weight models, mutates them (a flag dropped or given twice, a value of the wrong type or an extreme one:
-1, 0, 1e309, nan, 2**64, "", "--", unicode, a lone surrogate, 100 KB; another command's flag; a file that is
missing, a folder, empty, binary, not UTF-8, /dev/null, a FIFO, a huge sparse one; stdin empty, binary or not
UTF-8; a GPTCLI_* variable or the config file with a bad value) and runs each in process (gptcli.cli.app.run,
streams swapped as Typer's CliRunner does) in its own scratch folder. The oracle: a documented exit code, no
traceback, a failure that says one `error:` line (and at most one `hint:` line) as the last thing on stderr, no
case over --timeout CPU seconds, the process's memory within --max-rss-growth. Each failure is printed with its
argv, stdin and environment (cut short) and the run exits 1; tests/test_cli_fuzz.py runs a seeded few.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzz_limits import Hang, rss_mib, time_limit

REPO = Path(__file__).resolve().parents[1]
EXIT_CODES = {0, 1, 2, 3, 4, 5, 6, 130, 143}
SURROGATE = os.fsdecode(b"\xff\xfe")  # what a non-UTF-8 argv byte becomes in Python: lone surrogates

# Valid invocations; {NAME} is a file or folder of the case's world (World.paths).
CORPUS: list[str] = [
    "generate hi -m {llama} -n 3 --temperature 0",
    "generate hi -m {llama} -n 3 --json --seed 7 --stats",
    "generate ROMEO: --raw -m {gpt2} -n 4 --temperature 0.8 --top-p 0.9 --top-k 5 --min-p 0.05",
    "generate -f {prompt} -m {gpt2} -n 2 --json",
    "generate hi -m {llama} -n 3 --stop END --stop . --system terse --repetition-penalty 1.1",
    "generate hi -m {llama} -n 3 --presence-penalty 0.5 --frequency-penalty 0.3 --no-repetition-stop",
    "generate hi -m {llama} -n 4 --format json",
    "generate hi -m {llama} -n 4 --regex [a-z]{{3}}",
    "generate hi -m {llama} -n 4 --json-schema {schema}",
    "generate hi -m {llama} -n 4 --grammar {grammar}",
    "generate -f {prompt} -m {llama} -n 2 --template translate --var to=French",
    "generate -f {prompt} -m {llama} -n 2 --to French",
    "generate -f {prompt} -m {llama} -n 2 --question why?",
    "generate hi -m {llama} -n 2 --chat-template {template}",
    "generate hi -m {llama} -n 2 --on-overflow truncate --max-tokens 2",
    "generate --batch {batch} -m {llama} -n 2 -o {out}.jsonl",
    "generate --batch {batch} -m {llama} -n 2 -o {out}.jsonl --resume --parallel 2 --kv-budget 1MiB",
    "generate hi -m {llama} -n 2 --config {config}",
    "generate hi -m {llama} -n 2 --backend torch --device cpu --dtype float32 --precision fp32 --threads 1",
    "generate hi -m {llama} -n 2 --url http://127.0.0.1:9/v1",
    "chat -m {llama} -n 3 --plain",
    "chat -m {llama} -n 3 --jsonl --system terse --temperature 0",
    "chat -m {llama} -n 3 --plain --format json",
    "chat -m {llama} -n 3 --plain --continue",
    "chat -m {llama} -n 3 --plain --no-context-reuse --chat-template {template}",
    "summarize {prompt} -m {llama} -n 4 --length short --format bullets",
    "summarize {prompt} -m {llama} -n 4 --strategy map-reduce --chunk-tokens 40 --overlap 4 --json",
    "bench -m {llama} --in-process -p 8 -n 2 -r 1",
    "bench -m {llama} --in-process -p 8 -n 2 -r 1 --depth 0,8 -o json --output {out}.jsonl",
    "bench -m {llama} --in-process -p 8 -n 2 -r 1 --npl 1,2 -o md",
    "bench -m {llama} --in-process --mode latency --prompts {prompt} --max-tokens 2 -r 1",
    "train --data {corpus} --preset tiny --max-iters 2 --out {out} --json",
    "train --data {corpus} --preset tiny --max-iters 2 --out {out} --set optim.lr=3e-4 --batch-size 2",
    "train --data {corpus} --preset gpt2-small --dry-run",
    "train --data {corpus} --preset tiny --max-iters 2 --tokenizer bpe --vocab-size 300 --out {out}",
    "eval perplexity {prompt} -m {gpt2} --window 64 --stride 32 --json",
    "eval perplexity {prompt} -m {gpt2} -n 20",
    "export {gpt2} --precision fp32 -o {out} --json",
    "models list",
    "models list --json",
    "models info {llama} --json",
    "models info {gpt2}",
    "models pull no-such-model",
    "models rm nothing-here",
    "chats list --json",
    "chats show 20200101-000000-fuzz",
    "chats export 20200101-000000-fuzz --format json",
    "chats export 20200101-000000-fuzz --format md -o {out}.md",
    "chat --resume 20200101-000000-fuzz -m {llama} -n 2 --plain",
    "chat --continue -n 2 --jsonl",
    "generate -f - -m {llama} -n 2",
    "summarize - -m {llama} -n 2",
    "eval perplexity - -m {gpt2} --window 64 --stride 64",
    "chats show 20261129-210101-322a",
    "chats export 20261129-2101 --format md -o {out}.md",
    "chats rm 20261129-210101-322a",
    "templates list --json",
    "templates show translate",
    "templates path",
    "runs list {folder} --json",
    "runs show {folder}",
    "config show --json",
    "config show --config {config}",
    "config path",
    "config init {out}.yaml --force",
    "config init -",
    "backends --json",
    "backends",
    "serve --help",
    "--version",
    "-q generate hi -m {llama} -n 2",
    "-v models list",
]

ODD_VALUES: list[str] = [
    "-1", "0", "1", "1e309", "-1e309", "nan", "inf", "-inf", str(2**64), str(-(2**63)), "1e-320", "0x10", "1_000",
    "", " ", "--", "-", "-x", "é中🙂", SURROGATE, "a\nb", "a\tb", "x" * 100_000, "1,2,3", ",", "1,,2", "0,0",
    "true", "null", "[]", "{}", "auto", "cuda", "onnx", "int4", "bfloat16", "1GiB", "0B", "-1MiB", "99999999999TiB",
    "http://[::1", "file:///etc/passwd", "ftp://x", "../../..", "/", "~", "$HOME", "%s%n", "{input}", "{0}",
    "=", "a=", "=b", "optim.lr", "optim.lr=nan", "model.n_layer=0", "nope.key=1", "train.seed=-1",
]  # fmt: skip

ENV_VARS = [
    "GPTCLI_MODEL", "GPTCLI_BACKEND", "GPTCLI_DEVICE", "GPTCLI_DTYPE", "GPTCLI_PRECISION", "GPTCLI_THREADS",
    "GPTCLI_ON_OVERFLOW", "GPTCLI_SYSTEM", "GPTCLI_CHAT_TEMPLATE", "GPTCLI_ALLOW_PICKLE", "GPTCLI_TRUST_REMOTE_CODE",
    "GPTCLI_TEMPERATURE", "GPTCLI_TOP_K", "GPTCLI_TOP_P", "GPTCLI_MIN_P", "GPTCLI_REPETITION_PENALTY",
    "GPTCLI_FREQUENCY_PENALTY", "GPTCLI_PRESENCE_PENALTY", "GPTCLI_MAX_TOKENS", "GPTCLI_SEED", "GPTCLI_STOP",
    "GPTCLI_REPETITION_STOP", "GPTCLI_IGNORE_EOS", "GPTCLI_BACKEND_PATHS", "GPTCLI_PLUGINS", "GPTCLI_TORCH_IMPL",
    "GPTCLI_ORT_SPIN", "GPTCLI_API_KEY", "GPTCLI_ALLOWED_ORIGINS", "GPTCLI_PULL_FIND_LINKS", "GPTCLI_HOME",
]  # fmt: skip

BAD_CONFIGS: list[bytes] = [
    b"[", b"a: b: c", b"sampling: {temperature: nan}", b"sampling: {temperature: -1}", b"model: [1, 2]",
    b"\xff\xfe\x00binary", b"a: &a [*a, *a]", b"sampling: {max_tokens: 99999999999999999999999}",
    b"!!python/object/apply:os.system ['true']", b"\tmodel: x", b"model: a\nmodel: b", b"sampling: 5", b"null",
    b"- 1", b"true: 1", b"1: 2", b"threads: 0", b"threads: 1.5", b"sampling: {seed: 9223372036854775808}",
    b"sampling: {stop: [1, {}]}", b"device: tpu", b"temprature: 1", b"system: 5", b"chat_template: ''",
    b"backend: ''", b"model: ''", b"sampling: {top_p: .nan}", b"sampling: {temperature: .inf}", b"",
    b"x: " + b"a" * 2_000_000, b"model: \"\\ud800\"", b"sampling: {top_k: true}", b"---\n...\n---\nmodel: x",
]  # fmt: skip


@dataclass
class Case:
    argv: list[str]
    stdin: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    config: bytes | None = None  # the user config file's bytes, when the case writes one
    chat: bytes | None = None  # a saved conversation's file (20200101-000000-fuzz), when the case writes one
    what: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        argv = shlex.join(a if len(a) < 200 else a[:60] + f"...({len(a)} chars)" for a in self.argv)
        extra = f" stdin={self.stdin[:80]!r}" if self.stdin else ""
        extra += f" env={ {k: v[:80] for k, v in self.env.items()} }" if self.env else ""
        extra += f" config={self.config[:120]!r}" if self.config is not None else ""
        extra += f" chat={self.chat[:300]!r}" if self.chat is not None else ""
        return f"[{', '.join(self.what)}] gptcli {argv}{extra}"


@dataclass
class World:
    """The files a run shares: the tiny models (read-only), odd files, and a fresh scratch folder per case."""

    root: Path
    models: dict[str, Path]
    files: dict[str, Path] = field(default_factory=dict)
    odd_files: list[str] = field(default_factory=list)

    def paths(self, scratch: Path) -> dict[str, str]:
        return {
            "llama": str(self.models["llama"]),
            "gpt2": str(self.models["gpt2"]),
            **{name: str(path) for name, path in self.files.items()},
            "out": str(scratch / "out"),
            "folder": str(scratch),
        }


def make_world(root: Path, models: dict[str, Path] | None = None) -> World:
    """The files of a run in `root`, over the test suite's tiny models (made there unless given)."""
    if models is None:
        sys.path.insert(0, str(REPO))
        from tests.conftest import build_tiny_models

        models = build_tiny_models(root / "models")
    world = World(root, models)
    files = root / "files"
    files.mkdir()
    texts = {
        "prompt": "ROMEO: But soft, what light through yonder window breaks? It is the east.\n" * 3,
        "corpus": "ROMEO: But soft, what light through yonder window breaks?\nIt is the east, and Juliet.\n" * 80,
        "schema": '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}',
        "grammar": 'root ::= "yes" | "no"\n',
        "template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:",
        "config": "sampling:\n  temperature: 0.5\n",
        "batch": '{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}], "max_tokens": 2}\n',
    }
    suffix = {"schema": ".json", "grammar": ".gbnf", "template": ".jinja", "config": ".yaml", "batch": ".jsonl"}
    for name, text in texts.items():
        path = files / f"{name}{suffix.get(name, '.txt')}"
        path.write_text(text, encoding="utf-8")
        world.files[name] = path
    odd = {
        "empty": b"",
        "binary": bytes(range(256)) * 4,
        "latin1": "café naïve Zürich\n".encode("latin-1"),
        "newlines": b"\n" * 1000,
        "bom": b"\xef\xbb\xbfhello\r\nworld\r\n",
        "big": b"word " * 20_000,
        "json-junk": b'{"prompt": 5}\n[1]\nnot json\n{"messages": "x"}\n' + b"\xff\n",
        "one-line": b"x" * 5_000_000,
    }
    for name, data in odd.items():
        (files / f"odd-{name}").write_bytes(data)
        world.odd_files.append(str(files / f"odd-{name}"))
    sparse = files / "odd-sparse"
    with open(sparse, "wb") as handle:
        handle.truncate(20 << 30)  # 20 GiB of holes: zeros that take no disk
    (files / "odd-dir").mkdir()
    os.mkfifo(files / "odd-fifo")
    world.odd_files += [str(sparse), str(files / "odd-dir"), str(files / "odd-fifo"), "/dev/null", "/dev/zero"]
    world.odd_files += [str(files / "missing.txt"), str(files / "odd-dir") + "/", "x" * 5000, "-", ".", ""]
    world.odd_files += [str(files / ("surrogate-" + SURROGATE)), str(world.models["llama"] / "config.json")]
    return world


def leaf_commands() -> dict[str, list[tuple[list[str], bool, bool]]]:
    """Each command's path → its options: (names, takes a value?, repeatable?)."""  # see typed_values
    import typer

    from gptcli.cli.app import build_app

    found: dict[str, list[tuple[list[str], bool, bool]]] = {}

    def walk(command: Any, path: list[str]) -> None:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
            return
        found[" ".join(path)] = [
            (list(p.opts), not p.is_flag, bool(p.multiple)) for p in command.params if p.param_type_name == "option"
        ]
        OPTION_TYPES.update({p.opts[0]: p.type.name for p in command.params if p.param_type_name == "option"})

    walk(typer.main.get_command(build_app()), [])
    return found


OPTION_TYPES: dict[str, str] = {}  # an option's first name → its Click type's name (int, float, parse: a path, ...)
TYPED_VALUES = {
    "int": ["-1", "0", "1", "2", "3", str(2**31), str(2**63), str(2**64), "10" * 20, "1e3", "0x10", " 5", "-0"],
    "float": ["-1", "0", "-0.0", "1e-320", "1e309", "-1e309", "nan", "inf", "-inf", "1e30", "0.5", "2", "1e-9"],
}
# A value that is a real run's length, not an edge of the option: 2**31 training steps is a long run, as asked.
LONG_RUNS = {"--max-iters": str(2**31)}
PATH_OPTIONS = {"parse", "file", "path"}
OUTPUT_FLAGS = {"-o", "--output", "--out"}
TRAIN_KEYS = [
    "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.dropout", "data.tokenizer",
    "data.vocab_size", "data.val_fraction", "train.batch_size", "train.grad_accum", "train.max_iters", "train.seed",
    "train.device", "train.dtype", "train.threads", "train.compile", "optim.lr", "optim.min_lr", "optim.warmup_iters",
    "optim.lr_decay_iters", "optim.beta1", "optim.beta2", "optim.weight_decay", "optim.grad_clip", "eval.interval",
    "eval.iters", "eval.sample_tokens", "eval.sample_prompt", "checkpoint.interval", "checkpoint.keep_last",
]  # fmt: skip
SETTINGS_KEYS = [
    "model", "backend", "device", "dtype", "precision", "threads", "on_overflow", "system", "chat_template",
    "allow_pickle", "trust_remote_code", "sampling", "sampling.temperature", "sampling.top_k", "sampling.top_p",
    "sampling.min_p", "sampling.repetition_penalty", "sampling.frequency_penalty", "sampling.presence_penalty",
    "sampling.max_tokens", "sampling.seed", "sampling.stop", "sampling.repetition_stop", "sampling.ignore_eos",
]  # fmt: skip
YAML_VALUES = [
    "-1", "0", "1", ".nan", ".inf", "-.inf", "1e309", str(2**64), "''", "' '", "[]", "{}", "null", "true", "[1, 2]",
    "{a: 1}", '"\\ud800"', "'x'", "2.5", "0x10", "0o17", "1_000", "~", "'" + "x" * 100_000 + "'", "!!binary aGk=",
    "2001-12-14", "[[[[[]]]]]",
]  # fmt: skip
SLASH_LINES = [
    "/set temperature nan", "/set top_k -1", "/set max_tokens 99999999999999999999", "/set seed -1", "/set", "/set x",
    "/set temperature", "/format schema /dev/null", "/format regex (", "/format grammar /nonexistent", "/format json",
    "/format xml", "/format", "/system", "/system none", "/save /", "/save out.json", "/save out.md", "/save out.txt",
    "/save", "/load /dev/null", "/load /", "/load out.json", "/load", "/retry", "/undo", "/undo", "/reset", "/show",
    "/stats", "/help", "/?", "/nope", "//not a command", "/", "/exit now", "/load " + "y" * 300, "/save " + "y" * 300,
]  # fmt: skip


def typed_value(option: str, rng: random.Random, world: World) -> str:
    """A value for `option` at an edge of its own type (a number for a number, a file for a path), or any."""
    kind = OPTION_TYPES.get(option, "")
    if kind.split()[0] in TYPED_VALUES and rng.random() < 0.8:
        return rng.choice([value for value in TYPED_VALUES[kind.split()[0]] if value != LONG_RUNS.get(option)])
    if kind in PATH_OPTIONS and rng.random() < 0.8:
        return rng.choice(world.odd_files)
    return odd_value(rng, world)


def odd_value(rng: random.Random, world: World) -> str:
    return rng.choice(world.odd_files) if rng.random() < 0.25 else rng.choice(ODD_VALUES)


def command_of(argv: list[str], commands: dict[str, Any]) -> str | None:
    words = [a for a in argv if a not in {"-q", "-v"}]
    for length in (2, 1):
        if " ".join(words[:length]) in commands:
            return " ".join(words[:length])
    return None


def chat_file(rng: random.Random, world: World) -> bytes:
    """A saved conversation (as `gptcli chat` writes one) with one field or message changed, or odd bytes."""
    if rng.random() < 0.15:
        return rng.choice([b"", b"\x00\x01", b"{", b"[]", b"null", b"\xff\xfe{}", b'{"format": 1}', b"{}" * 100_000])
    said = {"role": "assistant", "content": "Hi!", "time": "2020-01-01T00:00:01+0000", "stats": {"new_tokens": 2}}
    chat: dict[str, Any] = {
        "format": 1, "id": "20200101-000000-fuzz", "title": "hi", "model": str(world.models["llama"]),
        "created": "2020-01-01T00:00:00+0000", "updated": "2020-01-01T00:00:01+0000", "system": "be brief",
        "sampling": {"temperature": 0.5}, "window_start": 0, "output": {"format": "json"},
        "messages": [{"role": "user", "content": "hi", "time": "2020-01-01T00:00:00+0000"}, said],
    }  # fmt: skip
    odd: list[Any] = [None, -1, 0, 2**64, 1e308, "", "x" * 100_000, SURROGATE, [], {}, [None], {"a": 1}, True, "\x00"]
    spots: list[tuple[Any, Any]] = [(chat, key) for key in chat] + [(chat["sampling"], "temperature")]
    spots += [(chat["output"], "format")] + [(m, key) for m in chat["messages"] for key in m]
    spots += [(chat["messages"], i) for i in range(2)] + [(said["stats"], "new_tokens")]
    holder, key = rng.choice(spots)
    if rng.random() < 0.2 and isinstance(holder, dict):
        del holder[key]
    else:
        holder[key] = rng.choice(odd)
    if rng.random() < 0.2 and isinstance(chat.get("messages"), list):
        chat["messages"] = chat["messages"] * rng.choice([0, 3, 5000])
    return json.dumps(chat, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def mutate(rng: random.Random, world: World, scratch: Path, commands: dict[str, Any]) -> Case:
    template = rng.choice(CORPUS)
    argv = [part.format(**world.paths(scratch)) for part in shlex.split(template)]
    case = Case(argv)
    command = command_of(argv, commands)
    if command == "chat":
        case.stdin = rng.choice([b"hello\n", b"hi\n/show\n/stats\n/help\nbye\n", b"/load nothing\n", b"\n"])
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.choice(
            ["drop", "duplicate", "value", "flag", "other", "file", "stdin", "env", "config"]
            + ["set"] * 6
            + ["train", "yaml", "slash", "chatfile"] * 2
        )
        start = 1 + (command is not None and " " in command)
        options = commands.get(command or "", [])
        if kind == "drop" and len(argv) > start:
            index = rng.randrange(start, len(argv))
            del argv[index : index + rng.choice([1, 2])]
        elif kind == "duplicate" and len(argv) > start:
            index = rng.randrange(start, len(argv))
            argv[index:index] = argv[index : index + 2]
        elif kind == "value" and len(argv) > start:
            argv[rng.randrange(start, len(argv))] = odd_value(rng, world)
        elif kind == "flag" and options:
            names, takes_value, _ = rng.choice(options)
            argv += [rng.choice(names), odd_value(rng, world)] if takes_value else [rng.choice(names)]
        elif kind == "set" and options:  # an option of this command, with a value at an edge of its type
            names, takes_value, _ = rng.choice(options)
            spots = [i for i, a in enumerate(argv[:-1]) if a in names]
            value = typed_value(names[0], rng, world)
            if not takes_value:
                argv.append(rng.choice(names))
            elif spots:
                argv[rng.choice(spots) + 1] = value
            else:
                argv += [rng.choice(names), value]
        elif kind == "train" and command == "train":
            argv += ["--set", f"{rng.choice(TRAIN_KEYS)}={rng.choice([*TYPED_VALUES['float'], *ODD_VALUES[:30]])}"]
        elif kind == "yaml":
            key, value = rng.choice(SETTINGS_KEYS), rng.choice(YAML_VALUES)
            nested = f"{key.split('.')[0]}:\n  {key.split('.')[1]}: {value}" if "." in key else f"{key}: {value}"
            case.config = f"model: {world.models['llama']}\n{nested}\n".encode()
        elif kind == "slash" and command == "chat":
            lines = [rng.choice(SLASH_LINES) for _ in range(rng.randint(1, 4))]
            case.stdin = "\n".join(["hi", *lines, "bye"]).encode("utf-8", "surrogateescape") + b"\n"
        elif kind == "chatfile":
            case.chat = chat_file(rng, world)
        elif kind == "other":
            names, takes_value, _ = rng.choice(rng.choice(list(commands.values())) or [(["--json"], False, False)])
            argv += [rng.choice(names), odd_value(rng, world)] if takes_value else [rng.choice(names)]
        elif kind == "file":
            spots = [i for i, a in enumerate(argv) if a.startswith(str(world.root)) or a.startswith(str(scratch))]
            if spots:
                argv[rng.choice(spots)] = rng.choice(world.odd_files)
        elif kind == "stdin":
            case.stdin = rng.choice(
                [b"", b"\x00\x01\x02binary", b"caf\xe9\n", b"\xff" * 10, b"hi\n" * 30, b"x" * 2_000_000, b"\n"]
            )
        elif kind == "env":
            case.env[rng.choice(ENV_VARS)] = rng.choice([*ODD_VALUES[:60], *world.odd_files])
        elif kind == "config":
            case.config = rng.choice(BAD_CONFIGS)
        case.what.append(kind)
    if case.chat is None and ("fuzz" in template or "--continue" in template):
        case.chat = chat_file(rng, world)
    if command_of(argv, commands) == "serve" and not {"--help", "-h"} & set(argv):
        argv.append("--help")  # a server would start and wait
    if command_of(argv, commands) == "train" and "gpt2-small" in argv and "--dry-run" not in argv:
        argv.append("--dry-run")  # a real GPT-2 small run takes minutes and 3+ GiB, as asked: no edge
    return case


def feed_fifo(path: str, seconds: float, done: threading.Event) -> None:
    """Write a line into the FIFO once a reader opens it (as `<(echo ...)` does), giving up after `seconds` or
    when the case is `done` (a feeder left from an earlier case would feed the wrong reader)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done.is_set():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            time.sleep(0.05)
            continue
        try:
            os.write(fd, b"ROMEO: hello from a pipe\n")
        except OSError:
            pass
        finally:
            os.close(fd)
        return


def drain_fifo(path: str, seconds: float, done: threading.Event) -> None:
    """Read the FIFO a command writes to (as `>(gzip > x)` does) for `seconds`, or until the case is `done`: a
    drainer left open would take the line a later case's feeder writes for its command, which then waits for
    a writer forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not done.is_set():
            try:
                os.read(fd, 1 << 16) or time.sleep(0.05)
            except BlockingIOError:
                time.sleep(0.05)
    finally:
        os.close(fd)


def output_problems(code: int, stdout: str, stderr: str, quoted: int = 0) -> list[str]:
    """What is wrong with a run's exit code and output (`quoted`: its arguments' length, which an error may quote)."""
    problems = []
    if code not in EXIT_CODES:
        problems.append(f"exit {code}, not a documented code")
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if "Traceback" in text:
            problems.append(f"a traceback on {name}: {text[text.index('Traceback') :][-600:]!r}")
    if code not in (0, 130, 143):
        lines = [line for line in stderr.splitlines() if line.strip()]
        errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        if not errors and not (code == 2 and "Usage: " in stdout + stderr):  # a command group alone: its help
            problems.append(f"exit {code} without an error: line: {stderr[-400:]!r}")
        elif errors:
            tail = lines[errors[-1] :]
            if len(tail) > 2 or (len(tail) == 2 and not tail[1].startswith("hint: ")):
                problems.append(f"the error is not one error: line and one hint: line: {tail[:4]!r}")
            if "internal error" in tail[0]:
                problems.append(f"an internal error: {tail[0][:400]!r}")
            if len(tail[0]) > 2000 + quoted:
                problems.append(f"an error line of {len(tail[0])} characters: {tail[0][:200]!r}")
    return problems


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    problems: list[str]


def run_case(case: Case, world: World, scratch: Path, timeout: float) -> Outcome:
    """Run `case` in process in `scratch` (its working folder, home and config), with the oracle's verdict."""
    from typer.testing import CliRunner

    from gptcli.cli.app import run

    home, config_home = scratch / "home", scratch / "xdg-config"
    (config_home / "gptcli").mkdir(parents=True, exist_ok=True)
    # The user config makes the tiny Llama the default model (a run without -m would convert the real one).
    config = f"model: {world.models['llama']}\n".encode() if case.config is None else case.config
    (config_home / "gptcli" / "config.yaml").write_bytes(config)
    if case.chat is not None:
        (home / "data" / "chats").mkdir(parents=True, exist_ok=True)
        (home / "data" / "chats" / "20200101-000000-fuzz.json").write_bytes(case.chat)
    env = {
        "GPTCLI_HOME": str(home),
        "XDG_CONFIG_HOME": str(config_home),
        "XDG_DATA_HOME": str(scratch / "xdg-data"),
        "XDG_CACHE_HOME": str(scratch / "xdg-cache"),
        "HF_HUB_OFFLINE": "1",
        "NO_COLOR": "1",
        **{key: None for key in os.environ if key.startswith("GPTCLI_")},
        **case.env,
    }
    fifo = str(world.root / "files" / "odd-fifo")
    done = threading.Event()
    helper = None
    if fifo in case.argv or fifo in case.env.values():
        written = any(a == fifo and b in OUTPUT_FLAGS for b, a in zip(case.argv, case.argv[1:], strict=False))
        written |= {"config", "init"} <= set(case.argv)  # its argument is where it writes (a FIFO: written through)
        helper = threading.Thread(target=drain_fifo if written else feed_fifo, args=(fifo, timeout, done), daemon=True)
        helper.start()
    cwd = os.getcwd()
    os.chdir(scratch)
    started = time.monotonic()
    try:
        with CliRunner().isolation(input=case.stdin, env=env) as (stdout, stderr, _):
            try:
                with time_limit(timeout, cpu=True):
                    code = run(case.argv)
            except Hang as exc:
                return Outcome(-1, "", "", [f"hang: {exc}"])
            except BaseException:  # run() returns a code for everything
                return Outcome(-1, "", "", ["an exception escaped run(): " + traceback.format_exc(limit=-4)[-1500:]])
            out = stdout.getvalue().decode("utf-8", "replace")
            err = stderr.getvalue().decode("utf-8", "replace")
    finally:
        os.chdir(cwd)
        done.set()
        if helper is not None:
            helper.join()
    problems = output_problems(code, out, err, quoted=sum(map(len, [*case.argv, *case.env.values()])))
    if time.monotonic() - started > 5 * timeout:
        problems.append(f"took {time.monotonic() - started:.1f} s")
    return Outcome(code, out, err, problems)


@dataclass
class Failure:
    case: Case
    code: int
    problems: list[str]

    def __str__(self) -> str:
        return f"{self.case}\n    exit {self.code}: " + "\n    ".join(self.problems)


def fuzz_cli(
    world: World, cases: int, seed: int, timeout: float = 20.0, codes: Counter[int] | None = None, verbose: bool = False
) -> list[Failure]:
    codes = Counter() if codes is None else codes
    rng = random.Random(seed)
    commands = leaf_commands()
    failures = []
    for number in range(cases):
        scratch = Path(tempfile.mkdtemp(prefix=f"case{number}-", dir=world.root))
        case = mutate(rng, world, scratch, commands)
        outcome = run_case(case, world, scratch, timeout)
        codes[outcome.code] += 1
        if (
            verbose and outcome.code == 1 and not outcome.problems and "cannot connect" not in outcome.stderr
        ):  # not the user's input: worth a look
            print(f"note: {case}\n    exit 1: {outcome.stderr.strip()[-300:]!r}"[:1200], flush=True)
        if outcome.problems:
            failures.append(Failure(case, outcome.code, outcome.problems))
            if verbose:
                print(failures[-1], flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="invocations to run (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="CPU seconds a case may take (20; 5x that of wall time)"
    )
    parser.add_argument("--max-rss-growth", type=float, default=2048, help="MiB the process may grow by (2048)")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print each failure as it is found, and each exit 1",
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory() as folder:
        world = make_world(Path(folder))
        before, started, codes = rss_mib(), time.monotonic(), Counter[int]()
        failures = fuzz_cli(world, args.cases, args.seed, args.timeout, codes, args.verbose)
    if not args.verbose:
        for failure in failures:
            print(failure)
    print(
        f"{args.cases} invocations (seed {args.seed}) in {time.monotonic() - started:.0f} s: {len(failures)} "
        f"failures; peak RSS {rss_mib():.0f} MiB (from {before:.0f}); exit codes {dict(sorted(codes.items()))}"
    )
    if not math.isfinite(grown := rss_mib() - before) or grown > args.max_rss_growth:
        print(f"the process grew by {grown:.0f} MiB, over --max-rss-growth {args.max_rss_growth:g}")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
