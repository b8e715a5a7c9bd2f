"""gptcli: train, run, chat with and benchmark GPT-style language models."""

import os

__version__ = "0.1.0"

# OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after each product before they sleep. The lean
# engine's one-row steps may run on numpy's BLAS (backends/lean_tuning.py), and a prefill or batched step
# right after them then shared its cores with a spinning thread: the default model prefilled 64 tokens
# at 358 t/s instead of 566. 2^20 cycles (~0.4 ms) outlasts the gaps inside a step (decode unchanged:
# 32.2 vs 33.5 tok/s; 2^16 lost 25 %). OpenBLAS reads this when numpy loads: it must be set before.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
