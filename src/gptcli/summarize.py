"""Summaries of any length of text: one pass when it fits, map-reduce on the model's own token counts otherwise.

stuff:      the whole document in one prompt.
map-reduce: split on paragraph, then sentence, then token boundaries into chunks that fit; summarise each
            ("map"), then combine the partial summaries ("reduce"), in groups and recursively while they
            still do not fit together.

A stage's calls run concurrently through the engine (`parallel` per step; decoding is bound by memory,
so eight chunks together cost little more than one), with chunks cut to give every place one (short
chunks are also cheaper to read: attention grows with length). `calls` runs them elsewhere instead
(an OpenAI-compatible server, `parallel` requests at a time).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gptcli.config import SamplingConfig
from gptcli.decoding import Event, Finished, Token
from gptcli.engine import Engine, EngineLimits, run_all
from gptcli.errors import GptcliError, InputError, UsageError
from gptcli.prompts import Messages, build_prompt, messages_for
from gptcli.summary_options import FORMATS, LENGTHS, SummaryOptions
from gptcli.templates import Template
from gptcli.textio import split_text, text_pieces

COMBINE_SYSTEM = "You merge partial summaries of one document into a single faithful summary. Never invent facts."
COMBINE_USER = (
    "These are summaries of consecutive parts of one document. Combine them into one summary of the whole "
    "document {length}, {format}.\n\n{input}"
)

MIN_PARALLEL_CHUNK = 384  # tokens: below this a chunk's instructions outweigh its text
DEFAULT_PARALLEL = 8  # chunks summarised together when --parallel is not given (and the KV budget allows)


@dataclass(frozen=True)
class StageProgress:
    """Where a summary stands: calls done in this stage, tokens generated so far, a rough ETA."""

    stage: str
    done: int
    total: int
    tokens: int = 0
    tokens_per_s: float = 0.0
    eta_s: float | None = None


Progress = Callable[[StageProgress], None]
# Runs a stage's calls (each the messages of one prompt) and yields (call index, event) as they come.
StageCalls = Callable[[list[Messages], SamplingConfig], Iterator[tuple[int, Event]]]


class SummaryInterrupted(Exception):
    """Ctrl-C during a summary, or an `error` after chunk summaries had finished (a server that went away):
    `result.partials` holds the chunk summaries that were finished."""

    def __init__(self, result: SummaryResult, error: GptcliError | None = None) -> None:
        super().__init__("interrupted" if error is None else str(error))
        self.result = result
        self.error = error


@dataclass
class Call:
    """One model call: what it was for and its token counts."""

    stage: str  # "stuff" | "map" | "combine"
    level: int
    prompt_tokens: int | None  # None: a server that did not say
    input_tokens: int
    output_tokens: int
    seconds: float
    finish_reason: str


@dataclass
class SummaryResult:
    summary: str
    strategy: str
    input_tokens: int
    context_length: int
    chunk_budget: int
    chunks: list[int] = field(default_factory=list)  # token count of each map chunk
    combine_levels: int = 0
    calls: list[Call] = field(default_factory=list)
    seconds: float = 0.0
    parallel: int | None = 1  # None: cut short before it was chosen (from the KV budget, as the model loaded)
    partials: list[str] = field(default_factory=list)  # the map stage's finished chunk summaries, in order
    interrupted: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "partial": self.interrupted,
            "partials": self.partials if self.interrupted else [],
            "parallel": self.parallel,
            "strategy": self.strategy,
            "input_tokens": self.input_tokens,
            "context_length": self.context_length,
            "chunk_budget": self.chunk_budget,
            "chunks": len(self.chunks),
            "chunk_tokens": self.chunks,
            "combine_levels": self.combine_levels,
            "calls": [c.__dict__ for c in self.calls],
            "prompt_tokens": None if None in (counts := [c.prompt_tokens for c in self.calls]) else sum(counts),
            "completion_tokens": sum(c.output_tokens for c in self.calls),
            "total_s": round(self.seconds, 3),
        }


def plain_summary_prompt(messages: Messages) -> str:
    """Without a chat template: the instructions, the text, and a cue to start the summary."""
    head = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
    return f"{head}{messages[-1]['content']}\n\nSummary:"


class Summarizer:
    """Runs the summary pipeline over one loaded model (backend + tokenizer), or over `calls` made
    elsewhere (then `backend` is None, `context_length` is that model's, and `tokenizer` may estimate)."""

    def __init__(
        self,
        backend: Any,
        tokenizer: Any,
        template: Template,
        sampling: SamplingConfig,
        *,
        progress: Progress | None = None,
        variables: dict[str, str] | None = None,
        parallel: int | None = None,
        kv_budget_tokens: int | None = None,
        calls: StageCalls | None = None,
        context_length: int | None = None,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.template = template
        self.sampling = sampling
        self.progress = progress or (lambda update: None)
        # Only the variables this template uses (a user's own summarize template may not have them all).
        self.variables = {k: v for k, v in (variables or {}).items() if k in template.fields}
        template.check_filled_by("gptcli summarize", variables or {})
        if parallel is not None and parallel < 1:
            raise UsageError(f"--parallel must be at least 1, got {parallel}")
        if calls is not None:
            self.calls, self.context, self.parallel = calls, int(context_length or 0), parallel or DEFAULT_PARALLEL
            self.window = self.context
            return
        self.calls = self._engine_calls
        self.context = int(backend.info.context_length)
        limits = EngineLimits(max_running=parallel or DEFAULT_PARALLEL, kv_budget_tokens=kv_budget_tokens)
        self.engine = Engine(backend, tokenizer, limits)
        self.window = min(self.context, self.engine.kv_budget)  # one call's prompt and reply: what the KV budget holds
        # Without --parallel: as many chunks at once as the KV budget holds at a typical chunk's size.
        per_chunk = min(self.context, MIN_PARALLEL_CHUNK * 4) + sampling.max_tokens
        self.parallel = parallel or max(1, min(DEFAULT_PARALLEL, self.engine.kv_budget // per_chunk))

    # -- token accounting ----------------------------------------------------------------------

    def count(self, text: str) -> int:
        """Tokens in `text`, a piece at a time (one encoding of a 60 MB text took 8.6 GB and ignored Ctrl-C)."""
        return sum(len(self.tokenizer.encode(piece, add_special_tokens=False)) for piece in text_pieces(text))

    def cut(self, text: str, budget: int) -> list[str]:
        """`text` cut every `budget` tokens (or up to 7 fewer: never inside a character), a piece at a time."""
        chunks: list[str] = []
        ids: list[int] = []
        for piece in text_pieces(text):
            ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
            start = 0
            while len(ids) - start >= budget:
                end = self._whole_char_end(ids, start + budget, start)
                chunks.append(self.tokenizer.decode(ids[start:end]))
                start = end
            del ids[:start]
        return chunks + ([self.tokenizer.decode(ids)] if ids else [])

    def _splits_char(self, ids: Sequence[int], at: int) -> bool:
        """Whether a cut before ids[at] falls inside a character: a byte-level tokenizer spells a CJK character
        or an emoji in several tokens (one may end a character and start the next), each side decoding to U+FFFD."""
        if at <= 0 or at >= len(ids):
            return False
        before = self.tokenizer.decode(ids[max(0, at - 8) : at])
        return not self.tokenizer.decode(ids[max(0, at - 8) : at + 8]).startswith(before)

    def _whole_char_end(self, ids: Sequence[int], end: int, start: int = 0) -> int:
        """`end`, or the nearest of the 7 tokens before it (after `start`) that cuts no character."""
        for at in range(end, max(start, end - 8), -1):
            if not self._splits_char(ids, at):
                return at
        return end

    def prompt_ids(self, system: str | None, user: str) -> list[int]:
        return build_prompt(self.tokenizer, messages_for(user, system), plain=plain_summary_prompt).ids

    def _engine_calls(self, requests: list[Messages], sampling: SamplingConfig) -> Iterator[tuple[int, Event]]:
        prompts = (build_prompt(self.tokenizer, messages, plain=plain_summary_prompt).ids for messages in requests)
        return run_all(self.engine, [(ids, sampling) for ids in prompts])

    def _render(self, combine: bool, text: str) -> tuple[str | None, str]:
        if not combine:
            return self.template.render(text, self.variables)
        values = self.template.bind(self.variables)
        user = COMBINE_USER.format(
            length=values.get("length", LENGTHS["medium"][0]),
            format=values.get("format", FORMATS["paragraph"]),
            input=text,
        )
        return COMBINE_SYSTEM, user

    def overhead(self, combine: bool = False) -> int:
        return len(self.prompt_ids(*self._render(combine, "")))

    def input_budget(self, combine: bool = False) -> int:
        """Tokens of document text one call can take, leaving room for the instructions and the reply."""
        return self.window - self.overhead(combine) - self.sampling.max_tokens - 8  # 8: join/re-tokenise slack

    # -- the pipeline --------------------------------------------------------------------------

    def run(self, text: str, options: SummaryOptions) -> SummaryResult:
        """The summary; Ctrl-C at any point (even while the text is counted and cut) is a SummaryInterrupted
        holding the chunk summaries that finished."""
        options.check()
        start = time.perf_counter()
        result = SummaryResult("", options.strategy, 0, self.context, 0, parallel=self.parallel)
        result.seconds = start  # until the end: when the run started (an interrupted result reports its time)
        try:
            return self._run(text, options, result)
        except (KeyboardInterrupt, GptcliError) as exc:
            error = exc if isinstance(exc, GptcliError) else None
            if error is not None and not result.partials:
                raise
            result.interrupted = True  # the finished chunk summaries are the user's: kept (then the error)
            result.seconds = time.perf_counter() - start
            raise SummaryInterrupted(result, error) from error

    def _run(self, text: str, options: SummaryOptions, result: SummaryResult) -> SummaryResult:
        start = result.seconds
        total = result.input_tokens = self.count(text)
        strategy = options.strategy
        # One pass when the text fits with room for a reply (shortened to what is left, if need be).
        room = self.window - self.overhead() - 8 - total
        fits = room >= min(self.sampling.max_tokens, 32)
        if strategy == "auto":
            strategy = "stuff" if fits else "map-reduce"
        if strategy == "stuff":
            if not fits:  # at most: what leaves room for the shortest reply a pass is given
                most = room + total - min(self.sampling.max_tokens, 32)
                window, lift = self.window_limit()
                raise InputError(
                    f"the text is {total} tokens but one pass takes at most {most} with this model"
                    if most > 0
                    else f"{window} is too small for one pass: the instructions alone take {self.overhead()} tokens",
                    hint="use --strategy map-reduce (or auto)" if most > 0 else lift,
                )
            self.sampling = replace(self.sampling, max_tokens=min(self.sampling.max_tokens, room))
        elif min(self.input_budget(), self.input_budget(combine=True)) < 2 * self.sampling.max_tokens:
            # A combine step must fit at least two partial summaries, or it could never shrink them.
            limit = (self.window - max(self.overhead(), self.overhead(True)) - 8) // 3
            if limit < 16:
                window, lift = self.window_limit()
                overhead = max(self.overhead(), self.overhead(True))
                said = f"{window} is too small to summarise this text: the instructions alone take {overhead} tokens"
                raise InputError(said, hint=lift)
            self.sampling = replace(self.sampling, max_tokens=min(self.sampling.max_tokens, limit))
        budget, combine_budget = self.input_budget(), self.input_budget(combine=True)
        chunk_budget = budget if options.chunk_tokens is None else min(options.chunk_tokens, budget)
        overlap = options.overlap_for(chunk_budget)
        if options.chunk_tokens is None and self.parallel > 1:
            chunk_budget = self.parallel_chunk(total, budget, overlap)
        result.strategy, result.chunk_budget = strategy, chunk_budget
        if strategy == "stuff":
            result.summary = self._calls("stuff", 0, [text], result)[0]
        else:
            chunks = self.chunk(text, chunk_budget, overlap)
            # Paragraph cuts leave chunks short: grow the size until one wave fits the batch (no lone 9th chunk).
            while options.chunk_tokens is None and len(chunks) > self.parallel > 1 and chunk_budget < budget:
                chunk_budget = min(budget, chunk_budget + max(chunk_budget // 8, 16))
                chunks = self.chunk(text, chunk_budget, overlap)
            result.chunk_budget = chunk_budget
            result.chunks = [self.count(c) for c in chunks]
            result.summary = self.reduce(self._calls("map", 0, chunks, result), combine_budget, result)
        result.seconds = time.perf_counter() - start
        return result

    def window_limit(self) -> tuple[str, str]:
        """What caps one call's prompt and reply (the context, or a smaller --kv-budget), and how to lift it."""
        if self.window < self.context:
            return f"the KV budget ({self.window} tokens, --kv-budget)", "raise --kv-budget"
        return f"the model's context ({self.context} tokens)", "use a model with a longer context"

    def parallel_chunk(self, total: int, budget: int, overlap: int) -> int:
        """A chunk size that gives every place in the batch a chunk, within [MIN_PARALLEL_CHUNK, budget]."""
        per_place = -(-total // self.parallel) + overlap
        smallest = max(MIN_PARALLEL_CHUNK, 2 * overlap + 1)  # the overlap must stay under half a chunk
        return max(min(budget, smallest), min(budget, per_place))

    def chunk(self, text: str, budget: int, overlap: int) -> list[str]:
        """Split into chunks of `budget` tokens; each after the first starts with the previous one's tail."""
        if overlap and overlap * 2 >= budget:
            raise UsageError(f"--overlap {overlap} must be under half of the chunk size ({budget} tokens)")
        step = budget - overlap
        pieces = split_text(text, step, self.count, self.cut)
        if not overlap:
            return pieces
        chunks = [pieces[0]]
        for prev, piece in itertools.pairwise(pieces):
            prev_ids = self.tokenizer.encode(prev, add_special_tokens=False)
            begin = max(0, len(prev_ids) - overlap)
            while begin < len(prev_ids) - overlap + 7 and self._splits_char(prev_ids, begin):
                begin += 1  # the tail starts at a whole character
            tail = self.tokenizer.decode(prev_ids[begin:]).lstrip()
            candidate = f"{tail} {piece}" if tail else piece
            chunks.append(candidate if self.count(candidate) <= budget else piece)
        return chunks

    def reduce(self, partials: list[str], budget: int, result: SummaryResult) -> str:
        """Combine partial summaries; group and recurse while they do not fit in one call."""
        level = 0
        while len(partials) > 1:
            level += 1
            groups = self._group(partials, budget)
            partials = self._calls("combine", level, ["\n\n".join(group) for group in groups], result)
        result.combine_levels = level
        return partials[0]

    def _group(self, partials: Sequence[str], budget: int) -> list[list[str]]:
        groups: list[list[str]] = [[]]
        for part in partials:
            part = self._clip(part, budget // 2)
            trial = "\n\n".join([*groups[-1], part])
            if groups[-1] and self.count(trial) > budget:
                groups.append([part])
            else:
                groups[-1].append(part)
        if len(groups) == len(partials):  # no pair fits together: merge pairs anyway (clipped to fit)
            groups = [list(partials[i : i + 2]) for i in range(0, len(partials), 2)]
            groups = [[self._clip(p, budget // 2) for p in g] for g in groups]
        return groups

    def _clip(self, text: str, budget: int) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return text if len(ids) <= budget else self.tokenizer.decode(ids[: self._whole_char_end(ids, budget)])

    def _calls(self, stage: str, level: int, texts: list[str], result: SummaryResult) -> list[str]:
        """Run one stage's calls concurrently; their summaries in input order. Ctrl-C keeps what finished."""
        label = stage if stage != "combine" else f"combine {level}"
        requests = [messages_for(user, system) for system, user in (self._render(stage == "combine", t) for t in texts)]
        outputs: list[str | None] = [None] * len(texts)
        generated = [0] * len(texts)
        began = time.perf_counter()
        self.progress(StageProgress(label, 0, len(texts)))
        done = 0
        for index, event in self.calls(requests, self.sampling):
            if isinstance(event, Token):
                if event.id is not None:
                    generated[index] += 1
                    self.progress(self._estimate(label, done, generated, outputs, began))
                continue
            assert isinstance(event, Finished)
            if event.reason == "interrupted":
                result.interrupted = True
                continue
            outputs[index] = event.text.strip()
            if stage == "map":  # the finished ones in the document's order, whenever the run stops
                result.partials = [text or "" for text in outputs if text is not None]
            done += 1
            result.calls.append(
                Call(
                    stage=stage,
                    level=level,
                    prompt_tokens=event.stats.prompt_tokens,
                    input_tokens=self.count(texts[index]),
                    output_tokens=event.stats.new_tokens,
                    seconds=round(event.stats.total_s, 4),
                    finish_reason=event.reason,
                )
            )
            self.progress(self._estimate(label, done, generated, outputs, began))
        if result.interrupted:
            result.seconds = time.perf_counter() - result.seconds
            raise SummaryInterrupted(result)
        return [text or "" for text in outputs]

    def _estimate(
        self, stage: str, done: int, generated: list[int], outputs: list[str | None], began: float
    ) -> StageProgress:
        """Tokens so far and an ETA: the unfinished calls' remaining max_tokens at the current rate."""
        tokens = sum(generated)
        elapsed = time.perf_counter() - began
        rate = tokens / elapsed if elapsed > 0 else 0.0
        unfinished = (n for n, out in zip(generated, outputs, strict=True) if out is None)
        left = sum(max(self.sampling.max_tokens - n, 0) for n in unfinished)
        eta = left / rate if rate > 0 else None
        return StageProgress(stage, done, len(outputs), tokens, rate, eta)
