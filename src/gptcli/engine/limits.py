"""How much the engine may run at once: the limits, the KV budget (tokens or a size), a snapshot of its state."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from gptcli.backends.base import Backend
from gptcli.errors import ConfigError, InputError
from gptcli.hardware import available_memory_bytes

DEFAULT_PREFILL_CHUNK = 512
KV_MEMORY_FRACTION = 0.5  # of the memory available at start, when no --kv-budget is given
MAX_KV_BUDGET = 2**63 - 1  # positions: past this a count is no budget at all (and no int64 holds it)


@dataclass(frozen=True)
class EngineLimits:
    """How much the engine may run at once."""

    max_running: int = 8  # sequences decoded together (--parallel)
    kv_budget_tokens: int | None = None  # KV positions across running sequences (None: from free memory)
    max_queue: int = 256  # waiting sequences before submit() refuses
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens per sequence per step
    # prompt tokens per step in all (one chunk always goes; prompts that end in the step may use twice this)
    step_prefill_tokens: int = DEFAULT_PREFILL_CHUNK
    prefix_cache: int = 0  # finished sequences whose prompt KV is kept for later prompts that start alike


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for progress lines and /metrics."""

    running: int
    waiting: int
    kv_used_tokens: int
    kv_budget_tokens: int
    kv_cached_tokens: int  # positions held by the prefix cache (given back whenever a sequence needs them)
    steps: int
    tokens_generated: int
    prompt_tokens: int


def parse_kv_budget(value: str | int | None, kv_bytes_per_token: int) -> int | None:
    """`--kv-budget`: a number of positions ("16384") or a size ("512MiB", "2GiB", "800MB")."""
    if value is None or value == "" or value == "auto":
        return None
    if isinstance(value, int):
        tokens = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b)?\s*", value.lower())
        if not match:
            raise ConfigError(
                f"--kv-budget {value!r} is neither a number of tokens nor a size",
                hint="use e.g. --kv-budget 16384 (tokens) or --kv-budget 512MiB",
            )
        number, unit = float(match.group(1)), match.group(2)
        if unit is None:
            tokens = int(number) if math.isfinite(number) else MAX_KV_BUDGET + 1
        else:
            scale = {"k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
            size = number * (1024 if "i" in unit else 1000) ** scale
            if kv_bytes_per_token <= 0:
                raise ConfigError(
                    "--kv-budget as a size needs to know how much one position costs, and this backend does not say",
                    hint="give --kv-budget as a number of tokens",
                )
            tokens = int(size // kv_bytes_per_token) if math.isfinite(size) else MAX_KV_BUDGET + 1
    if tokens > MAX_KV_BUDGET:  # 400 nines read as float infinity: int() of it was an internal error
        raise ConfigError(
            f"--kv-budget {value!r} is too large to be a budget",
            hint="use e.g. --kv-budget 16384 (tokens) or --kv-budget 8GiB, or leave it out for half the free memory",
        )
    if tokens < 1:
        raise ConfigError(f"--kv-budget {value!r} leaves no room for a single token", hint="raise --kv-budget")
    return tokens


def default_kv_budget(backend: Backend, max_running: int) -> int:
    """Half the free memory's worth of KV positions, at least one full context; or max_running contexts."""
    context = backend.info.context_length
    per_token = getattr(backend.info, "kv_bytes_per_token", 0)
    memory = available_memory_bytes()
    if per_token <= 0 or memory is None:
        return max_running * context
    return max(context, int(memory * KV_MEMORY_FRACTION // per_token))


def default_prefix_cache(backend: Backend, max_running: int) -> int:
    """Finished sequences whose prompt KV the engine keeps: `max_running` on the CPU, where a kept cache
    commits memory only for its positions; none on CUDA, where the KV pool reserves whole context slots."""
    return 0 if backend.info.device == "cuda" else max_running


def startable(reserves: Iterable[int], free_slots: int, kv_room: int) -> int:
    """How many waiting sequences (their KV reserves, oldest first) the next step starts, as the engine admits
    them: while a slot is free and the KV budget has room. The rest are the queue `--max-queue` bounds."""
    count = 0
    for reserve in reserves:
        if count >= free_slots or reserve > kv_room:
            break
        count, kv_room = count + 1, kv_room - reserve
    return count


def kv_reserve(prompt_tokens: int, max_tokens: int, context: int, kv_budget: int) -> int:
    """The KV positions a sequence reserves when it starts; an InputError when it could never run."""
    if prompt_tokens < 1:
        raise InputError("the prompt is empty", hint="give the model some text")
    if prompt_tokens >= context:
        raise InputError(
            f"the prompt is {prompt_tokens} tokens but the model's context holds {context}", hint="shorten the prompt"
        )
    if prompt_tokens >= kv_budget:  # no max_tokens helps: the hint to lower it sent users round in circles
        raise InputError(
            f"the prompt is {prompt_tokens} tokens, and the KV budget ({kv_budget}) leaves no room for a reply",
            hint="raise --kv-budget, or shorten the prompt",
        )
    reserve = min(prompt_tokens + max(max_tokens, 1), context)
    if reserve > kv_budget:  # a max_tokens past the context reserves up to the context: say so, or 33 + 100000 = 8192
        capped = f", up to the context's {context}" if reserve < prompt_tokens + max(max_tokens, 1) else ""
        raise InputError(
            f"this sequence needs {reserve} KV positions (prompt {prompt_tokens} + max tokens {max_tokens}{capped})"
            f" but the KV budget is {kv_budget}",
            hint="raise --kv-budget, or lower --max-tokens",
        )
    return reserve
