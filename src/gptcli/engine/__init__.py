"""The engine: many sequences decoded together, joining and leaving at step boundaries (continuous batching).

scheduler.py holds the Engine (the step, admission under the KV budget, cancellation, background mode)
and sequence.py its record of one sequence; limits.py the limits and the KV budget; handle.py the
caller's side of a sequence; run.py the drivers for the caller's thread (`generate` for one sequence,
`run_all` for many); prefix_cache.py the prompt chunks kept and shared between sequences that start
alike; scoring.py the step's prompts read position by position (their own logprobs).
"""

from gptcli.engine.handle import SequenceHandle
from gptcli.engine.limits import (
    DEFAULT_PREFILL_CHUNK,
    EngineLimits,
    EngineStats,
    default_kv_budget,
    default_prefix_cache,
    parse_kv_budget,
)
from gptcli.engine.run import generate, run_all
from gptcli.engine.scheduler import Engine

__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "Engine",
    "EngineLimits",
    "EngineStats",
    "SequenceHandle",
    "default_kv_budget",
    "default_prefix_cache",
    "generate",
    "parse_kv_budget",
    "run_all",
]
