"""Structured output under stress: one seeded round of scripts/stress_constraints.py through each caller.

Many sequences with different constraints (grammars, regexes, a JSON Schema, a choice list) and free text with
stop strings, min_tokens and stop_token_ids share one engine batch at temperature 1.5-2.0 over the tiny random
Llama: every reply that ended is a whole match, every reply cut short the start of one, and every token of a reply
run here is one its grammar allowed. `scripts/stress_constraints.py --rounds N --seed S` runs many more.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import load_script

stress = load_script("stress_constraints")


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stress") / "tiny-llama"
    shutil.copytree(tiny_models["llama"], folder)
    return stress.widened(folder)


@pytest.fixture
def seen() -> Iterator[Any]:
    """The replies one test checked, by kind and finish reason."""
    stress.SEEN.clear()
    yield stress.SEEN
    stress.SEEN.clear()


def _finishes(seen: Any) -> set[str]:
    """The finish reasons constrained replies had."""
    return {key.split()[-1] for key in seen if not key.startswith(("free", "cached", "route"))}


def test_sixty_four_constraints_in_one_engine_batch_each_hold(model, seen):
    problems = stress.run_engine(model, stress.draw_cases(random.Random(0), 64))
    assert not problems, "\n".join(problems[:10])
    assert {"stop", "length"} <= _finishes(seen) and sum(seen.values()) == 64


def test_concurrent_server_requests_each_keep_their_constraint(model, seen):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    with stress.served(model) as live:
        problems = stress.run_server(live.url, stress.draw_cases(random.Random(1), 36, server=True))
        assert not problems, "\n".join(problems[:10])
        assert stress.wait_idle(live.engine)  # the clients that left were cancelled, nothing is left running
    assert {"stop", "length", "cancelled"} <= _finishes(seen)
    assert seen["cached prompt tokens"] > 0  # the shared long prompt came from the prefix cache
    assert seen["route ollama"] and seen["route responses"]  # JSON Schemas through ollama's API and the Responses API


def test_a_batch_file_under_a_run_wide_yes_no_grammar_and_stop_y(model, seen, tmp_path):
    """The lines without a constraint of their own follow `--grammar` (yes/no), and `--stop y` never cuts one."""
    cases = stress.draw_cases(random.Random(2), 24)
    problems = stress.run_cli_batch(model, cases, tmp_path, yes_no_flags=True)
    assert not problems, "\n".join(problems[:10])
    assert seen["gbnf-yes-no stop"] >= 3


@pytest.mark.integration
@pytest.mark.slow
def test_the_default_model_answers_only_yes_or_no_under_the_yes_no_grammar(default_model, seen):
    """The review twice saw `No` from the default model under `root ::= "yes" | "no"` (not seen again): its free
    replies to these questions start with "No", so a reply that escaped the grammar would show here."""
    yes_no = next(kind for kind in stress._kinds() if kind.name == "gbnf-yes-no")
    questions = ["Is fire cold? Answer with one word.", "Can fish climb trees? Answer Yes or No.", "Is the sun cold?"]
    cases = [
        stress.Case(
            f"q{n}",
            questions[n % 3],
            n % 2 == 0,
            yes_no,
            {"temperature": t, "top_k": 0, "seed": n, "max_tokens": 4, **yes_no.fields("llama")},
        )
        for n, t in enumerate([0.0, 1.5] * 24)
    ]
    problems = stress.run_engine(default_model.path, cases)
    assert not problems, "\n".join(problems[:10])
    assert seen["gbnf-yes-no stop"] == len(cases)
