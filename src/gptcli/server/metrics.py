"""Prometheus metrics in the text exposition format, written by hand (no client library needed).

Counters and histograms are updated from the event loop and read by /metrics; the engine's gauges
(queue depth, running sequences, KV use) are read from its snapshot at scrape time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

PREFIX = "gptcli"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(pairs: dict[str, str]) -> str:
    if not pairs:
        return ""
    escaped = (f'{k}="{v}"'.replace("\n", " ") for k, v in pairs.items())
    return "{" + ",".join(escaped) + "}"


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus expects them."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_number(b)}"}} {n}' for b, n in zip(self.bounds, self.counts, strict=True)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_number(self.total)}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """What the server counts: requests by route and status, tokens, latencies; plus the engine's gauges."""

    def __init__(self, snapshot: Callable[[], Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._snapshot = snapshot
        self.requests: dict[tuple[str, str], int] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            key = (route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_finished(self, *, prompt_tokens: int, cached_tokens: int, new_tokens: int, e2e_s: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
            self.generated_tokens += new_tokens
            self.e2e.observe(e2e_s)

    def engine_gauges(self) -> dict[str, float]:
        if self._snapshot is None:
            return {}
        snap = self._snapshot()
        gauges = {
            "queue_depth": getattr(snap, "waiting", 0),
            "running_sequences": getattr(snap, "running", 0),
            "kv_used_tokens": getattr(snap, "kv_used_tokens", 0),
            "kv_cached_tokens": getattr(snap, "kv_cached_tokens", 0),
        }
        budget = getattr(snap, "kv_budget_tokens", None)
        if budget:
            gauges["kv_budget_tokens"] = budget
            gauges["kv_usage_ratio"] = gauges["kv_used_tokens"] / budget
        return {k: float(v) for k, v in gauges.items()}

    def render(self) -> str:
        """The exposition text: HELP and TYPE lines, then samples."""
        p = PREFIX
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} {kind}", *samples])

        with self._lock:
            family(
                "requests_total",
                "counter",
                "HTTP requests by route and status.",
                [
                    f"{p}_requests_total{_labels({'route': route, 'status': status})} {n}"
                    for (route, status), n in sorted(self.requests.items())
                ],
            )
            family(
                "prompt_tokens_total",
                "counter",
                "Prompt tokens of finished requests.",
                [f"{p}_prompt_tokens_total {self.prompt_tokens}"],
            )
            family(
                "prompt_cached_tokens_total",
                "counter",
                "Prompt tokens served from the cache.",
                [f"{p}_prompt_cached_tokens_total {self.cached_tokens}"],
            )
            family(
                "generation_tokens_total",
                "counter",
                "Tokens generated for finished requests.",
                [f"{p}_generation_tokens_total {self.generated_tokens}"],
            )
            family(
                "time_to_first_token_seconds",
                "histogram",
                "Request arrival to first token.",
                self.ttft.lines(f"{p}_time_to_first_token_seconds"),
            )
            family(
                "e2e_request_latency_seconds",
                "histogram",
                "Request arrival to its last token.",
                self.e2e.lines(f"{p}_e2e_request_latency_seconds"),
            )
        helps = {
            "queue_depth": "Sequences waiting for a slot in the running batch.",
            "running_sequences": "Sequences in the running batch.",
            "kv_used_tokens": "KV-cache positions held by running sequences.",
            "kv_cached_tokens": "KV-cache positions the prefix cache holds for later prompts (given back on demand).",
            "kv_budget_tokens": "KV-cache positions the engine may hold.",
            "kv_usage_ratio": "kv_used_tokens / kv_budget_tokens.",
        }
        for name, value in self.engine_gauges().items():
            family(name, "gauge", helps[name], [f"{p}_{name} {_number(value)}"])
        return "\n".join(lines) + "\n"
