"""Chat latency: time from Enter to the first token of a later turn, with and without reusing the context.

    .venv/bin/python benchmarks/bench_chat.py                  # default model, CPU
    .venv/bin/python benchmarks/bench_chat.py --history 4 --repeats 3 --model ./my-model

Both runs hold the same conversation (greedy, so the replies are identical). "reuse" keeps one KV cache
for the conversation and prefills only the new suffix; "no reuse" prefills the whole history each turn
(what a stateless chat loop does). The measured span is `ChatSession.say()` → first Token event: template
rendering, tokenizing, prefill and the first sample, i.e. what the user waits for after pressing Enter.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

QUESTIONS = [
    "Tell me about the city of Paris: its history, its museums and what a visitor should see first.",
    "What about Rome? Compare it with Paris for a first-time visitor.",
    "Which of the two is better in winter, and why?",
    "Suggest a three-day plan for the one you prefer.",
    "And what should I eat there?",
    "Summarise our conversation in two sentences.",
]


def enter_to_first_token(chat, text: str) -> tuple[float, int, int]:
    """Seconds from sending `text` to the first streamed token; plus prompt and reused token counts."""
    from gptcli.decoding import Token

    start = time.perf_counter()
    turn = chat.say(text)
    first = None
    for event in turn:
        if first is None and isinstance(event, Token):
            first = time.perf_counter() - start
    stats = chat.last_stats
    return (first if first is not None else stats.total_s), stats.prompt_tokens, stats.cached_tokens


def run(runtime, settings, history: int, reuse: bool) -> tuple[float, int, int]:
    from gptcli.chat import ChatSession, Conversation

    chat = ChatSession(
        runtime.backend, runtime.tokenizer, settings, Conversation(model=settings.model), None, reuse_context=reuse
    )
    for question in QUESTIONS[:history]:
        for _ in chat.say(question):
            pass
    return enter_to_first_token(chat, QUESTIONS[history])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--history", type=int, default=1, help="exchanges before the measured turn (1 = turn 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="reply length of the earlier turns")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not 1 <= args.history < len(QUESTIONS):
        parser.error(f"--history must be in 1..{len(QUESTIONS) - 1}")

    from gptcli.config import SamplingConfig, Settings
    from gptcli.runtime import open_runtime

    settings = Settings(
        model=args.model,
        device="cpu",
        dtype="float32",
        threads=args.threads,
        sampling=SamplingConfig(temperature=0, max_tokens=args.max_tokens),
    )
    runtime = open_runtime(settings, lambda m: print(m, file=sys.stderr))
    run(runtime, settings, 1, True)  # warm-up: first-call overheads out of the measurement

    samples: dict[bool, list[tuple[float, int, int]]] = {True: [], False: []}
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits both modes alike
        for reuse in (True, False):
            samples[reuse].append(run(runtime, settings, args.history, reuse))
    rows = {reuse: (statistics.median(s[0] for s in got), got[0][1], got[0][2]) for reuse, got in samples.items()}

    turn = args.history + 1
    print(f"chat: Enter → first token on turn {turn} · {args.model} · torch/cpu · median of {args.repeats}")
    print(f"{'mode':<12} {'prompt tok':>10} {'reused tok':>10} {'prefilled':>10} {'TTFT ms':>10} {'speed-up':>9}")
    base = rows[False][0]
    for reuse, label in ((False, "no reuse"), (True, "reuse")):
        seconds, prompt, cached = rows[reuse]
        ms, ratio = seconds * 1000, base / seconds
        print(f"{label:<12} {prompt:>10} {cached:>10} {prompt - cached:>10} {ms:>10.0f} {ratio:>8.2f}x")


if __name__ == "__main__":
    main()
