"""A seeded stress test of structured output: many sequences with different constraints in one engine batch.

    .venv/bin/python scripts/stress_constraints.py --rounds 20 --seed 1

Each round draws requests at high temperature (1.5-2.0, top_k 0, top_p 1, min_p 0, each its own seed) that mix a
GBNF yes/no grammar, a Lark grammar, regexes, a JSON Schema (an enum, bounded integers, a nested object, an array
with minItems/maxItems), a choice list and free text with stop strings, min_tokens, stop_token_ids and max_tokens
cuts, and runs them through every caller: the engine as `generate --batch` drives it (lines parsed, then
run_all), a batch file through the CLI (with and without a run-wide `--grammar` and `--stop y`), and the server
(chat and text completions, streamed and not, concurrently, a long prompt shared through its prefix cache, a
`logit_bias` pushing a token the grammar forbids, `stop: ["y"]` and `ignore_eos` beside a grammar, logprobs, some
clients leaving mid-stream, JSON Schemas through ollama's /api/chat and the Responses API too); penalties
(repetition, presence, frequency) change the masked logits of some.
The oracle, over a tiny random-weight model (tests/conftest.py), whose replies are random: a reply that ended
("stop") is a whole match (Python's own check: json.loads and jsonschema, re.fullmatch, the list of choices, plus
llguidance over its bytes), one cut short (length, context, a client gone) can still be completed into a match,
each token of a reply run here is one the grammar allowed at its place (a fresh matcher replays them), free text
holds no stop string and no fewer than min_tokens tokens. Each failure is printed and the run exits 1;
tests/test_structured_stress.py runs one round of each caller.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "No way"]},
        "n": {"type": "integer", "minimum": -5, "maximum": 120},
        "place": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "zip": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["answer", "n", "place", "tags"],
    "additionalProperties": False,
}
SMALL_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "r": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["ok", "r"],
    "additionalProperties": False,
}
YES_NO = 'root ::= "yes" | "no"\n'
LIST_GBNF = 'root ::= item ("," item){0,3}\nitem ::= [0-9]{1,2} | "x"\n'
LARK = 'start: "ab" | "cd" WORD\nWORD: /[a-z]{1,4}/\n'
REGEXES = [r"[0-9]{2,4}-(yes|no)", r"[a-z]{1,6}( [a-z]{1,6}){0,2}\.", r"(yes|no)"]
CHOICES = ["yes", "no", "Nope, never"]
STOPS = [["y"], ["e", "th"], ["o"], [" "]]
PROMPTS = ["Is the sky blue?", "Once upon a time", "Answer No or Yes:", "def add(a, b):", "The capital of France is"]
# A long prompt several requests share (the server's prefix cache reads its whole chunks once).
SHARED = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 2


SEEN: Counter[str] = Counter()  # replies checked, by kind and finish reason (and server prompt tokens cached)


@dataclass(frozen=True)
class Kind:
    """One kind of constraint: how a request asks for it (by field style), and whether a text fully matches."""

    name: str
    fields: Callable[[str], dict[str, Any]]  # style ("vllm", "structured", "llama") -> the request's fields
    constraint: Callable[[], Any]  # the OutputConstraint, for llguidance's check of the text's bytes
    matches: Callable[[str], bool]  # Python's own check of a whole reply


def _schema_fields(schema: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    def fields(style: str) -> dict[str, Any]:
        if style == "structured":
            return {"structured_outputs": {"json": schema}}
        if style == "llama":
            return {"json_schema": schema}
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}

    return fields


def _valid(schema: dict[str, Any]) -> Callable[[str], bool]:
    import jsonschema

    def check(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    return check


def _kinds() -> list[Kind]:
    from gptcli import constraints

    def grammar(text: str) -> Callable[[str], dict[str, Any]]:
        return lambda style: {"structured_outputs": {"grammar": text}} if style == "structured" else {"grammar": text}

    kinds = [
        Kind(
            "gbnf-yes-no", grammar(YES_NO), lambda: constraints.grammar_text(YES_NO, "t"), lambda t: t in ("yes", "no")
        ),
        Kind(
            "gbnf-list",
            lambda style: {"guided_grammar": LIST_GBNF},
            lambda: constraints.grammar_text(LIST_GBNF, "t"),
            lambda t: re.fullmatch(r"([0-9]{1,2}|x)(,([0-9]{1,2}|x)){0,3}", t) is not None,
        ),
        Kind(
            "lark",
            grammar(LARK),
            lambda: constraints.grammar_text(LARK, "t"),
            lambda t: re.fullmatch(r"ab|cd[a-z]{1,4}", t) is not None,
        ),
        Kind(
            "choice",
            lambda style: (
                {"structured_outputs": {"choice": CHOICES}} if style == "structured" else {"guided_choice": CHOICES}
            ),
            lambda: constraints.choice(CHOICES, "t"),
            lambda t: t in CHOICES,
        ),
        Kind("schema", _schema_fields(SCHEMA), lambda: constraints.schema_constraint(SCHEMA, "t"), _valid(SCHEMA)),
        Kind(
            "small-schema",
            _schema_fields(SMALL_SCHEMA),
            lambda: constraints.schema_constraint(SMALL_SCHEMA, "t"),
            _valid(SMALL_SCHEMA),
        ),
    ]
    for number, pattern in enumerate(REGEXES):
        kinds.append(
            Kind(
                f"regex-{number}",
                lambda style, p=pattern: (
                    {"structured_outputs": {"regex": p}} if style == "structured" else {"guided_regex": p}
                ),
                lambda p=pattern: constraints.regex(p),
                lambda t, p=pattern: re.fullmatch(p, t) is not None,
            )
        )
    return kinds


@dataclass
class Case:
    """One request: its prompt (text, or a chat's user message), its fields, and what to check its reply against."""

    name: str
    prompt: str
    chat: bool
    kind: Kind | None  # None: free text
    fields: dict[str, Any]
    cancel_after: int = 0  # the server, streamed: the client leaves after this many chunks (0: never)
    stream: bool = False
    route: str = "openai"  # the server: or "ollama" (/api/chat), "responses" (/v1/responses), for a JSON Schema

    @property
    def stops(self) -> list[str]:
        stop = self.fields.get("stop") or []
        return [stop] if isinstance(stop, str) else list(stop)

    def line(self) -> dict[str, Any]:
        """As a batch line."""
        body: dict[str, Any] = {"id": self.name, **self.fields}
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"], body["raw"] = self.prompt, True
        return body


def draw_cases(rng: random.Random, count: int, *, server: bool = False, prefix: str = "c") -> list[Case]:
    """`count` requests, each with a constraint or none, a seed, a temperature of 1.5-2.0 and stopping options;
    with `server`: also what only the server takes (logit_bias, stop beside a grammar, streams, leaving)."""
    kinds = _kinds()
    cases = []
    for number in range(count):
        kind = rng.choice([*kinds, None, None])
        shared = server and rng.random() < 0.4
        prompt = SHARED if shared else rng.choice(PROMPTS)
        fields: dict[str, Any] = {
            "temperature": round(rng.uniform(1.5, 2.0), 3),
            "top_k": 0,
            "top_p": 1.0,
            "min_p": 0.0,
            "seed": rng.randrange(2**31),
            "max_tokens": rng.choice([1, 2, 3, 6, 12, 40, 60]),
        }
        if kind is not None and "schema" in kind.name:  # JSON takes more tokens: most replies end, some are cut
            fields["max_tokens"] = rng.choice([8, 150, 200, 200])
        if rng.random() < 0.3:
            fields["min_tokens"] = rng.randrange(0, fields["max_tokens"] + 1)
        if rng.random() < 0.3:  # penalties change the masked logits too (a forbidden -inf must stay -inf)
            fields["repetition_penalty"] = rng.choice([0.5, 1.3, 2.0])
            fields["presence_penalty"] = rng.choice([-2.0, 0.0, 2.0])
            fields["frequency_penalty"] = rng.choice([-2.0, 0.0, 2.0])
        if server and rng.random() < 0.2:
            fields["ignore_eos"] = True  # the grammar alone ends the reply
        if kind is not None:
            fields.update(kind.fields(rng.choice(["vllm", "structured", "llama"])))
            if server and rng.random() < 0.5:  # accepted and not applied: the grammar ends the reply
                fields["stop"] = rng.choice(STOPS)
            if server and rng.random() < 0.3:
                fields["logit_bias"] = {str(rng.randrange(300)): 100}  # most likely a token the grammar forbids
        else:
            if rng.random() < 0.6:
                fields["stop"] = rng.choice(STOPS)
            if rng.random() < 0.2:
                fields["stop_token_ids"] = [rng.randrange(1, 300) for _ in range(3)]
            if rng.random() < 0.2:
                fields["include_stop_str_in_output"] = True
        case = Case(f"{prefix}{number}", prompt, chat=rng.random() < 0.5, kind=kind, fields=fields)
        if server:
            if rng.random() < 0.2:  # each token's logprob and two alternatives, beside the sampling
                fields.update({"logprobs": True, "top_logprobs": 2} if case.chat else {"logprobs": 2})
            case.stream = rng.random() < 0.5
            if kind is not None and "schema" in kind.name and rng.random() < 0.4:
                case.route, case.stream = rng.choice(["ollama", "responses"]), False
            case.cancel_after = rng.choice([0, 0, 0, 1, 2]) if case.stream else 0
        cases.append(case)
    return cases


def _bytes_matcher(constraint: Any) -> Any:
    import llguidance

    from gptcli.constraints import grammar
    from gptcli.schema_width import _bytes_tokenizer

    return llguidance.LLMatcher(_bytes_tokenizer(), grammar(constraint), log_level=0)


def reply_problems(case: Case, text: str, finish: str, tokens: int | None, whole: bool = True) -> list[str]:
    """What is wrong with a reply (text, finish reason, its token count when known), by the case's rules.
    `whole` false: the client left mid-reply, so the text is a start."""
    problems = []
    SEEN[f"{case.kind.name if case.kind else 'free'} {finish}"] += 1
    said = f"{case.name} ({case.kind.name if case.kind else 'free'}, {finish}, {tokens} tokens): {text!r}"
    limit = case.fields["max_tokens"]
    if tokens is not None and (tokens > limit or (finish == "length" and tokens != limit)):
        problems.append(f"{said}: max_tokens is {limit}")
    if finish not in ("stop", "length", "context", "repetition", "cancelled"):
        problems.append(f"{said}: finish reason {finish}")
    if case.kind is not None:
        matcher = _bytes_matcher(case.kind.constraint())
        fits = matcher.consume_tokens(list(text.encode()))
        if not fits:
            problems.append(f"{said}: not a start of a {case.kind.name} match")
        elif whole and finish == "stop" and not (matcher.is_accepting() and case.kind.matches(text)):
            problems.append(f"{said}: ended ('stop') but is not a whole {case.kind.name} match")
        return problems
    minimum = case.fields.get("min_tokens", 0)
    if whole and finish == "stop" and tokens is not None and tokens < minimum:
        problems.append(f"{said}: fewer than min_tokens ({minimum})")
    keep = case.fields.get("include_stop_str_in_output", False)
    for stop in case.stops if minimum == 0 else []:
        at = text.find(stop)
        if at >= 0 and not (keep and at + len(stop) == len(text)):
            problems.append(f"{said}: holds the stop string {stop!r}")
    return problems


def cut_problems(case: Case, text: str, finish: str, full: str) -> list[str]:
    """A free reply a stop string ended: the text of its tokens up to the stop string (after it, with
    include_stop_str_in_output), never other text. `full`: its tokens' whole text."""
    if case.kind is not None or finish != "stop" or not case.stops:
        return []
    said = f"{case.name} (free, stop {case.stops}): {text!r} of {full!r}"
    if not full.startswith(text):
        return [f"{said}: not the start of its tokens' text"]
    rest = full[len(text) :]
    if case.fields.get("include_stop_str_in_output"):
        cut = not rest or any(text.endswith(stop) for stop in case.stops)
    else:
        cut = not rest or any(rest.startswith(stop) for stop in case.stops)
    return [] if cut else [f"{said}: cut where no stop string is"]


def token_problems(case: Case, token_ids: tuple[int, ...], tokenizer: Any, width: int) -> list[str]:
    """A reply's tokens replayed through a fresh matcher: each one the grammar allowed where it came."""
    import numpy as np

    from gptcli.constraints import open_constraint

    if case.kind is None:
        return []
    matcher = open_constraint(case.kind.constraint(), tokenizer)
    for place, token in enumerate(token_ids):
        if matcher.mask(np.zeros(width, dtype=np.float32)) is None or not matcher.allows(token):
            piece = tokenizer.decode([token])
            return [f"{case.name} ({case.kind.name}): token {token} ({piece!r}) at {place} is one the mask forbids"]
        matcher.advance(token)
    return []


# ------------------------------------------------------------------------------------------------------ the callers


def run_engine(model: Path, cases: list[Case], parallel: int = 32) -> list[str]:
    """The lines parsed and run as `generate --batch` runs them (batch_requests, then the engine's run_all)."""
    from gptcli.batch_requests import parse_request
    from gptcli.config import Settings
    from gptcli.decoding import Finished
    from gptcli.engine import Engine, EngineLimits, run_all
    from gptcli.runtime import open_runtime

    settings = Settings(model=str(model))
    runtime = open_runtime(settings, lambda message: None)
    tokenizer, context = runtime.tokenizer, runtime.backend.info.context_length
    parsed = [
        parse_request(n, json.dumps(c.line()).encode(), tokenizer, settings, context) for n, c in enumerate(cases)
    ]
    problems = [f"{c.name}: the line was refused: {r.error}" for c, r in zip(cases, parsed, strict=True) if r.error]
    engine = Engine(runtime.backend, tokenizer, EngineLimits(max_running=parallel))
    jobs = [(r.prompt_ids, r.settings.sampling) for r in parsed if r.settings is not None and not r.error]
    running = [c for c, r in zip(cases, parsed, strict=True) if r.settings is not None and not r.error]
    for index, event in run_all(engine, jobs):
        if isinstance(event, Finished):
            case = running[index]
            problems += reply_problems(case, event.text, event.reason, len(event.token_ids))
            problems += cut_problems(case, event.text, event.reason, tokenizer.decode(list(event.token_ids)))
            if event.reason == "error":
                problems.append(f"{case.name}: {event.error}")
            problems += token_problems(case, event.token_ids, tokenizer, runtime.backend.info.vocab_size)
    return problems


def run_cli_batch(model: Path, cases: list[Case], folder: Path, *, yes_no_flags: bool = False) -> list[str]:
    """The lines as a batch file through `gptcli generate --batch` (a subprocess). `yes_no_flags`: the run also
    gives `--grammar` (yes/no: the lines without a constraint of their own follow it) and `--stop y`."""
    flags: list[str] = []
    if yes_no_flags:
        (folder / "yes-no.gbnf").write_text(YES_NO)
        flags = ["--grammar", str(folder / "yes-no.gbnf"), "--stop", "y"]
        yes_no = next(kind for kind in _kinds() if kind.name == "gbnf-yes-no")
        cases = [_under_run_grammar(case, yes_no) for case in cases]
    lines, out = folder / "lines.jsonl", folder / "out.jsonl"
    lines.write_text("".join(json.dumps(case.line()) + "\n" for case in cases))
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "gptcli", "generate", "--batch", str(lines), "-m", str(model), "-o", str(out)]
    done = subprocess.run([*command, "-P", "16", *flags], capture_output=True, text=True, timeout=600, cwd=REPO)
    if done.returncode != 0:
        return [f"generate --batch exited {done.returncode}: {done.stderr.strip()[-500:]}"]
    problems = []
    results = {record["id"]: record for record in map(json.loads, out.read_text().splitlines())}
    for case in cases:
        record = results.get(case.name)
        if record is None or "error" in record:
            problems.append(f"{case.name}: no result ({record})")
            continue
        tokens = record["usage"]["completion_tokens"]
        problems += reply_problems(case, record["text"], record["finish_reason"], tokens)
    return problems


def _under_run_grammar(case: Case, kind: Any) -> Case:
    """A line under a run-wide grammar: no stop options of its own (a line's stop beside a grammar is refused), and
    the run's grammar when it asks for none."""
    fields = {k: v for k, v in case.fields.items() if k not in ("stop", "stop_token_ids", "include_stop_str_in_output")}
    return Case(case.name, case.prompt, case.chat, case.kind or kind, fields)


def run_server(url: str, cases: list[Case], workers: int = 12) -> list[str]:
    """The cases as concurrent requests to a server at `url` (chat or text completions, streamed or not)."""

    problems: list[str] = []
    lock = threading.Lock()

    def one(case: Case) -> None:
        with lock:
            SEEN[f"route {case.route}"] += 1
        if case.route != "openai":
            try:
                found = _schema_route(url, case)
            except Exception as exc:
                found = [f"{case.name}: {type(exc).__name__}: {exc}"]
            with lock:
                problems.extend(found)
            return
        route = "/v1/chat/completions" if case.chat else "/v1/completions"
        body = {**case.fields, "stream": case.stream}
        body.update({"messages": [{"role": "user", "content": case.prompt}]} if case.chat else {"prompt": case.prompt})
        if case.stream:
            body["stream_options"] = {"include_usage": True}
        try:
            found = _stream(url + route, body, case) if case.stream else _whole(url + route, body, case)
        except Exception as exc:  # a failed request is a failure of the run, never a crash of it
            found = [f"{case.name}: {type(exc).__name__}: {exc}"]
        with lock:
            problems.extend(found)

    threads = []
    for start in range(0, len(cases), workers):
        for case in cases[start : start + workers]:
            threads.append(threading.Thread(target=one, args=(case,)))
            threads[-1].start()
        for thread in threads:
            thread.join()
    return problems


def _text_of(choice: dict[str, Any]) -> str:
    if "message" in choice:
        return choice["message"].get("content") or ""
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


def _whole(url: str, body: dict[str, Any], case: Case) -> list[str]:
    import httpx

    response = httpx.post(url, json=body, timeout=120)
    if response.status_code != 200:
        return [f"{case.name}: {response.status_code} {response.text[:300]}"]
    answer = response.json()
    SEEN["cached prompt tokens"] += answer["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
    choice = answer["choices"][0]
    return reply_problems(case, _text_of(choice), choice["finish_reason"], answer["usage"]["completion_tokens"])


def _schema_route(url: str, case: Case) -> list[str]:
    """A JSON Schema case through ollama's /api/chat (its `format`) or the Responses API (its `text.format`)."""
    import httpx

    assert case.kind is not None
    schema, fields = case.kind.fields("llama")["json_schema"], case.fields
    sampling = {key: fields[key] for key in ("temperature", "top_p", "top_k", "min_p", "seed")}
    if case.route == "ollama":
        messages = [{"role": "user", "content": case.prompt}]
        options = {**sampling, "num_predict": fields["max_tokens"]}
        body = {"model": "tiny-llama", "messages": messages, "format": schema, "stream": False, "options": options}
        response = httpx.post(url + "/api/chat", json=body, timeout=120)
        if response.status_code != 200:
            return [f"{case.name}: {response.status_code} {response.text[:300]}"]
        reply = response.json()
        return reply_problems(case, reply["message"]["content"], reply["done_reason"], reply["eval_count"])
    text_format = {"format": {"type": "json_schema", "name": "s", "schema": schema}}
    body = {"input": case.prompt, "max_output_tokens": fields["max_tokens"], "text": text_format}
    body.update({key: sampling[key] for key in ("temperature", "top_p")})
    response = httpx.post(url + "/v1/responses", json=body, timeout=120)
    if response.status_code != 200:
        return [f"{case.name}: {response.status_code} {response.text[:300]}"]
    reply = response.json()
    finish = {"completed": "stop", "incomplete": "length"}.get(reply["status"], reply["status"])
    text = reply["output"][0]["content"][0]["text"]
    return reply_problems(case, text, finish, reply["usage"]["output_tokens"])


def _stream(url: str, body: dict[str, Any], case: Case) -> list[str]:
    """A streamed reply joined from its chunks; the client leaves after `case.cancel_after` of them."""
    import httpx

    pieces, finish, tokens, chunks = [], None, None, 0
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        if response.status_code != 200:
            return [f"{case.name}: {response.status_code} {response.read()[:300]!r}"]
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                SEEN["cached prompt tokens"] += chunk["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
            for choice in chunk.get("choices", []):
                pieces.append(_text_of(choice))
                finish = choice.get("finish_reason") or finish
            chunks += 1
            if case.cancel_after and chunks >= case.cancel_after and finish is None:
                return reply_problems(case, "".join(pieces), "cancelled", None, whole=False)
    if finish is None:
        return [f"{case.name}: the stream ended without a finish reason: {''.join(pieces)!r}"]
    return reply_problems(case, "".join(pieces), finish, tokens)


@contextmanager
def served(model: Path) -> Iterator[Any]:
    """The tiny model served (the real app and engine: tests/test_server.py's) from a thread, with a prefix cache
    and small prefill chunks, so requests alike share their prompt's KV; yields its Live (url, engine)."""
    sys.path.insert(0, str(REPO))
    from tests.test_server import serve_runtime

    from gptcli.config import Settings
    from gptcli.runtime import open_runtime

    runtime = open_runtime(Settings(model=str(model)), lambda message: None)
    limits = {"max_running": 12, "prefix_cache": 8, "prefill_chunk": 8, "step_prefill_tokens": 24}
    with serve_runtime(runtime, **limits) as live:
        yield live


def wait_idle(engine: Any, seconds: float = 30.0) -> bool:
    """Whether the engine has nothing running or waiting (the sequences of clients that left cancelled) in time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = engine.snapshot()
        if stats.running == 0 and stats.waiting == 0:
            return True
        time.sleep(0.05)
    return False


def widened(folder: Path) -> Path:
    """The tiny random Llama in `folder`, its context widened to 2,048 (fuzz_server.py's): room for long replies."""
    sys.path.insert(0, str(REPO / "scripts"))
    from fuzz_server import widen_context

    return widen_context(folder)


def tiny_model(root: Path) -> Path:
    """The test suite's tiny random Llama, made in `root`, its context widened."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import build_tiny_models

    return widened(build_tiny_models(root)["llama"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each caller (default 5)")
    parser.add_argument("--cases", type=int, default=64, help="requests per round and caller (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cli", action="store_true", help="skip the batch file through the CLI (slowest)")
    args = parser.parse_args()
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        model = tiny_model(Path(scratch))
        with served(model) as live:
            for round_number in range(args.rounds):
                rng = random.Random(args.seed * 1_000_003 + round_number)
                began = time.monotonic()
                found = run_engine(model, draw_cases(rng, args.cases))
                found += run_server(live.url, draw_cases(rng, args.cases, server=True))
                if not wait_idle(live.engine):
                    found.append(f"the server's engine still runs: {live.engine.snapshot()}")
                if not args.no_cli:
                    cases = draw_cases(rng, args.cases)
                    found += run_cli_batch(model, cases, Path(scratch))
                    found += run_cli_batch(model, cases, Path(scratch), yes_no_flags=True)
                took = time.monotonic() - began
                print(f"round {round_number + 1}/{args.rounds}: {len(found)} problems ({took:.0f} s)", flush=True)
                problems += found
    print("replies checked:", ", ".join(f"{key}: {count}" for key, count in sorted(SEEN.items())))
    for problem in problems[:50]:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
