"""Structured output's cost: decode tok/s with and without a constraint, the default model, the same run.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_structured.py [--rounds 3] [--backend torch] [--threads 2]

For each constraint (a JSON Schema with a list of objects, any JSON, a regex) the constrained reply is
generated first (greedy, up to --max-tokens); then the same prompt is generated without a constraint for
exactly as many tokens (EOS ignored), so both runs decode the same number of tokens at the same positions.
Rounds alternate the order of the two runs, so drift on a shared machine hits both alike; the table shows
medians. decode tok/s is `Stats.decode_tokens_per_s` (decode steps / decode time; the first token comes
from the prefill). "mask µs/tok" is the time inside the grammar (mask + advance) per token, measured by
wrapping `TokenConstraint`; the overhead % is 1 - constrained / free decode tok/s (target <= 10 %), and
"mask share" is the grammar's time over the constrained run's decode time (mask µs/tok x tok/s): the same
cost measured inside one run, so it does not move with the machine's load the way two runs' rates can.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gptcli import constraints  # noqa: E402
from gptcli.config import SamplingConfig, Settings  # noqa: E402
from gptcli.decoding import Finished  # noqa: E402
from gptcli.engine import generate  # noqa: E402
from gptcli.runtime import open_runtime  # noqa: E402

PEOPLE = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 4,
            "maxItems": 6,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "born": {"type": "integer", "minimum": 1000, "maximum": 2025},
                    "field": {"enum": ["science", "art", "politics", "sport", "music"]},
                },
                "required": ["name", "born", "field"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
CASES = [
    ("json_schema (people)", "List five famous people with the year they were born and their field, as JSON.", PEOPLE),
    ("json (any)", "Return a JSON object with the name, mass and number of moons of Mars.", "json"),
    (
        "regex (date list)",
        "Give some important dates of the twentieth century.",
        r"(19[0-9]{2}-[01][0-9]-[0-3][0-9]\n){8}",
    ),
]


class MaskClock:
    """Time spent inside the grammar (mask + advance), per token."""

    seconds = 0.0
    tokens = 0

    @classmethod
    def install(cls) -> None:
        mask, advance = constraints.TokenConstraint.mask, constraints.TokenConstraint.advance

        def timed_mask(self, logits):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return mask(self, logits)
            finally:
                cls.seconds += time.perf_counter() - start
                cls.tokens += 1

        def timed_advance(self, token_id):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return advance(self, token_id)
            finally:
                cls.seconds += time.perf_counter() - start

        constraints.TokenConstraint.mask = timed_mask  # type: ignore[method-assign]
        constraints.TokenConstraint.advance = timed_advance  # type: ignore[method-assign]


def run(runtime, ids: list[int], params: SamplingConfig) -> Finished:  # type: ignore[no-untyped-def]
    *_, finished = generate(runtime.backend, runtime.tokenizer, ids, params)
    return finished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args()
    MaskClock.install()
    runtime = open_runtime(Settings(backend=args.backend, threads=args.threads), lambda message: None)
    tok = runtime.tokenizer
    greedy = SamplingConfig(temperature=0, max_tokens=args.max_tokens, repetition_stop=False)
    rows = []
    for label, prompt, spec in CASES:
        if spec == "json":
            constraint = constraints.ANY_JSON
        elif isinstance(spec, dict):
            constraint = constraints.schema_constraint(spec, label)
        else:
            constraint = constraints.regex(spec)
        ids = tok.encode(tok.render_chat([{"role": "user", "content": prompt}]), add_special_tokens=False)
        run(runtime, ids, replace(greedy, constraint=constraint, max_tokens=4))  # warm: token table, grammar
        free_rates, held_rates, mask_us, reasons, tokens = [], [], [], set(), 0
        for round_ in range(args.rounds):
            # Round 0 runs the constrained reply first: it decides how many tokens both runs decode.
            order = ["held", "free"] if round_ % 2 == 0 else ["free", "held"]
            for which in order:
                if which == "held":
                    MaskClock.seconds, MaskClock.tokens = 0.0, 0
                    held = run(runtime, ids, replace(greedy, constraint=constraint))
                    tokens = len(held.token_ids)
                    held_rates.append(held.stats.decode_tokens_per_s)
                    mask_us.append(MaskClock.seconds / max(MaskClock.tokens, 1) * 1e6)
                    reasons.add(held.reason)
                    text = held.text
                else:
                    free = run(runtime, ids, replace(greedy, max_tokens=tokens, ignore_eos=True))
                    free_rates.append(free.stats.decode_tokens_per_s)
        free_tps, held_tps = statistics.median(free_rates), statistics.median(held_rates)
        valid = ""
        if constraint.kind != "regex":
            try:
                json.loads(text)
                valid = "parses"
            except ValueError:
                valid = "does not parse"
        rows.append(
            (label, tokens, free_tps, held_tps, statistics.median(mask_us), 1 - held_tps / free_tps, reasons, valid)
        )
    info = runtime.backend.info
    print(
        f"model {info.name} · backend {runtime.backend.name} {info.dtype} {info.device} · {args.rounds} rounds, medians"
    )
    header = (
        f"{'constraint':<22} {'tokens':>6} {'free tok/s':>11} {'constrained':>12} {'mask µs/tok':>12}"
        f" {'mask share':>10} {'overhead':>9}  finish"
    )
    print(header)
    print("-" * len(header))
    for label, tokens, free_tps, held_tps, mask, overhead, reasons, valid in rows:
        end = ",".join(sorted(reasons)) + (f" ({valid})" if valid else "")
        share = mask * 1e-6 * held_tps
        print(
            f"{label:<22} {tokens:>6} {free_tps:>11.1f} {held_tps:>12.1f} {mask:>12.0f} {share:>10.1%} {overhead:>9.1%}"
            f"  {end}"
        )


if __name__ == "__main__":
    main()
