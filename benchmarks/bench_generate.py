"""Torch backend vs transformers `generate` on the default model: decode, prefill, TTFT, RSS, cold start.

    .venv/bin/python benchmarks/bench_generate.py [--rounds 3] [--tokens 64] [--threads 2]

Every variant runs in its own child process (so peak RSS is its own), and the variants take turns
round by round, so drift on a shared machine hits them alike. Prints a table with ratios against
`generate` (fp32). Greedy decoding, same prompt, synthetic 512-token prompt for prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
VARIANTS = {
    "generate fp32": ("hf-generate", "float32"),
    "gptcli torch fp32": ("lean", "float32"),
    "gptcli torch fp32 (hf engine)": ("hf", "float32"),
    "gptcli torch bf16": ("lean", "bfloat16"),
}


def child(impl: str, dtype: str, tokens: int, threads: int) -> dict:
    """Measure one variant in this process; print a JSON line."""
    import torch

    torch.set_num_threads(threads)
    from gptcli.backends.base import LoadOptions
    from gptcli.backends.torch_backend import TorchBackend
    from gptcli.models import resolve_model
    from gptcli.prompts import encode_prompt
    from gptcli.tokenizer import Tokenizer

    folder = resolve_model("smollm2-135m-instruct").path
    tokenizer = Tokenizer(folder)
    ids = encode_prompt(tokenizer, PROMPT).ids
    long_ids = [(i * 7919) % 40000 + 100 for i in range(512)]
    if impl == "hf-generate":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

        class Clock:
            def __init__(self) -> None:
                self.times: list[float] = []

            def put(self, _value) -> None:
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        def run(prompt: list[int], n: int) -> tuple[float, list[float]]:
            clock = Clock()
            start = time.perf_counter()
            model.generate(
                torch.tensor([prompt]),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
            return start, clock.times[1:]  # the first put() is the prompt itself

        run(ids, 4)  # warm-up
        start, times = run(ids, tokens)
        ttft = times[0] - start
        decode = (len(times) - 1) / (times[-1] - times[0])
        start, times = run(long_ids, 1)
        prefill = 512 / (times[0] - start)
    else:
        os.environ["GPTCLI_TORCH_IMPL"] = impl
        backend = TorchBackend.load(folder, LoadOptions(device="cpu", dtype=dtype, threads=threads))

        def run(prompt: list[int], n: int) -> tuple[float, list[float]]:
            import numpy as np

            start = time.perf_counter()
            logits, cache = backend.forward(prompt, backend.new_cache())
            times = []
            for _ in range(n):
                token = int(np.argmax(logits))
                times.append(time.perf_counter())
                logits, cache = backend.forward([token], cache)
            return start, times

        run(ids, 4)
        start, times = run(ids, tokens)
        ttft = times[0] - start
        decode = (len(times) - 1) / (times[-1] - times[0])
        start = time.perf_counter()
        backend.forward(long_ids, backend.new_cache())
        prefill = 512 / (time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"decode": decode, "prefill": prefill, "ttft": ttft, "rss": rss}


COLD_GPTCLI = [sys.executable, "-m", "gptcli", "generate", PROMPT, "-n", "1", "--temperature", "0"]
COLD_HF = [
    sys.executable,
    "-c",
    f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
from gptcli.models import resolve_model
folder = resolve_model("smollm2-135m-instruct").path
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
ids = tok.apply_chat_template([{{"role": "user", "content": {PROMPT!r}}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
model.generate(ids, max_new_tokens=1, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True))
""",
]


def cold_start(cmd: list[str]) -> float:
    """Seconds from process start to the first byte on stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    proc.communicate()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.tokens, args.threads)))
        return

    subprocess.run([sys.executable, "-m", "gptcli", "models", "pull"], check=True, capture_output=True)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    colds: dict[str, list[float]] = {"generate fp32": [], "gptcli torch fp32": []}
    for round_ in range(args.rounds):
        for name, (impl, dtype) in VARIANTS.items():
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    impl,
                    dtype,
                    "--tokens",
                    str(args.tokens),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            )
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {name}: {results[name][-1]}", file=sys.stderr)
        colds["generate fp32"].append(cold_start(COLD_HF))
        colds["gptcli torch fp32"].append(cold_start(COLD_GPTCLI))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    base = "generate fp32"
    header = (
        f"{'variant':32} {'decode tok/s':>13} {'x gen':>6} {'prefill-512 tok/s':>18} {'x gen':>6} "
        f"{'TTFT ms':>8} {'peak RSS MB':>12} {'cold start s':>13}"
    )
    print(
        f"SmolLM2-135M-Instruct, CPU, {args.threads} threads, greedy, {args.tokens} new tokens, "
        f"median of {args.rounds} rounds"
    )
    print(header)
    print("-" * len(header))
    for name in VARIANTS:
        cold = f"{statistics.median(colds[name]):.2f}" if name in colds else "-"
        print(
            f"{name:32} {med(name, 'decode'):13.1f} {med(name, 'decode') / med(base, 'decode'):6.2f} "
            f"{med(name, 'prefill'):18.0f} {med(name, 'prefill') / med(base, 'prefill'):6.2f} "
            f"{med(name, 'ttft') * 1000:8.0f} {med(name, 'rss'):12.0f} {cold:>13}"
        )


if __name__ == "__main__":
    main()
