"""A scripted backend with one forward call that swallows a Ctrl-C, as a long native call may.

At its sixth call it says so on stderr and blocks (up to 30 s) until a SIGINT arrives, then swallows
that KeyboardInterrupt and goes on. The chat REPL's "a second Ctrl-C during the same reply saves and
exits 130" path can so be driven on purpose: the first Ctrl-C lands inside this call, always.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from tests.scripted import ScriptedBackend

STALL_AT_CALL = 5
WAITING = "stubborn backend: waiting for Ctrl-C"
SWALLOWED = "stubborn backend: Ctrl-C swallowed"


class StubbornBackend(ScriptedBackend):
    name: ClassVar[str] = "stubborn"

    def forward(self, ids: Sequence[int], cache: Any) -> tuple[np.ndarray, Any]:
        if len(self.calls) == STALL_AT_CALL:
            try:
                print(WAITING, file=sys.stderr, flush=True)
                time.sleep(30)
            except KeyboardInterrupt:
                print(SWALLOWED, file=sys.stderr, flush=True)
        return super().forward(ids, cache)
