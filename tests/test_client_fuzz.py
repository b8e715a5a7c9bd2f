"""scripts/fuzz_client.py's seeded subset: the client commands (`--url`) against a misbehaving server, in process.

The failures it found have their own tests beside the behaviour (tests/test_remote.py, test_client_mode.py)."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, load_script

pytest.importorskip("httpx")


fuzz = load_script("fuzz_client")


def test_client_commands_against_a_misbehaving_server_end_as_documented(isolated_home):
    # Every answer a mutation of a valid one; a case that hangs, reads an endless answer to its end, ends
    # in a traceback or an undocumented exit code, or loses the text that came before a break is a failure.
    failures = fuzz.fuzz(cases=120, seed=7, timeout=1.0)
    assert not failures, "\n".join(failures)


def test_the_fuzzer_sees_a_lost_reply():
    # The oracle itself: a stream cut after "Hel" whose text neither generate --json nor the chat kept.
    outcome = fuzz.Outcome(1, "", "error: http://127.0.0.1:1/v1 closed the stream", 0.1)
    assert "no --json object" in fuzz.partial_kept(outcome, "json", ["Hel"], REPO / "no-such-folder")
    assert "not saved in the chat" in fuzz.partial_kept(outcome, "chat", ["Hel"], REPO / "no-such-folder")
    assert "was not printed" in fuzz.partial_kept(outcome, "generate", ["Hel"], REPO / "no-such-folder")
