"""gptcli serve beside llama.cpp's own llama-server and `python -m llama_cpp.server`, in one run, one table.

    benchmarks/peers/build_llamacpp.sh                      # once: llama-server and the F32/Q4_0 GGUFs
    PYTHONPATH=src .venv/bin/python benchmarks/bench_serve_peers.py [--quick]

Each server is started in turn on a free loopback port with the same model (the default model: gptcli
fp32 and int4 against llama-server on the F32 and Q4_0 GGUFs made from the same weights, `-np 8 -cb`),
given the same load by bench_serve.py (vLLM's `bench serve` definitions, `ignore_eos`, greedy), then
stopped. The table puts every server's output tok/s and TTFT/E2E beside its matched peer, with ratios. With
`--passes N` every server runs N times, every other pass in reverse order, and each cell is matched with its peer's
cell of the same pass: the machine's drift over a run of many minutes reaches both sides alike.
Servers whose binaries or packages are missing are skipped with a note. 2 threads each. With
`--prefix-len N` every prompt of a level starts with the same N tokens (a shared system prompt or
document), and gptcli int4 also runs with `--prefix-cache 0` to show what its prefix cache saves.

Issue 14's concurrency-1 target is "within 10 % of `gptcli generate`'s own decode rate". So at concurrency 1 each
request to a gptcli server is followed by `gptcli generate` on the same prompt with the same backend flags (greedy,
`ignore_eos` through a config file, one process per prompt, the server idle meanwhile): the machine's drift reaches
both alike. The table's last column gives the server's 1000 / TPOT median, generate's median `--stats` decode tok/s
(the same quantity: decode steps over decode time), and the median over the prompts of each pair's ratio.

`llama_cpp.server` serves one request at a time. It is started with `--interrupt_requests False`, so a new
request waits instead of cutting the running one short. It has no `ignore_eos`, so its requests bias the
end-of-sequence tokens out of reach (`logit_bias` -100) to get the same output length.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / ".cache" / "peers"
LLAMA_SERVER = PEERS / "llama.cpp-build" / "bin" / "llama-server"
GGUF = PEERS / "gguf" / "smollm2-135m-instruct-{}.gguf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


Server = tuple[str, str, list[str], dict[str, str], dict]


def servers(threads: int, parallel: int, prefix: bool = False) -> list[Server]:
    """(name, matched precision, command with {port}, extra environment, extra request body); with `prefix`
    (prompts behind a shared prefix) also gptcli int4 without its prefix cache."""
    python = sys.executable
    gptcli = [
        python,
        "-m",
        "gptcli",
        "serve",
        "--port",
        "{port}",
        "--parallel",
        str(parallel),
        "--threads",
        str(threads),
    ]
    # llama_cpp.server has no ignore_eos: an end-of-sequence token biased out of reach does the same.
    no_eos = {"logit_bias": {str(token): -100 for token in sorted(eos_ids())}}
    rows = [
        ("gptcli serve onnx fp32", "fp32", [*gptcli, "--backend", "onnx", "--precision", "fp32"], {}, {}),
        ("gptcli serve onnx int4", "int4", [*gptcli, "--backend", "onnx", "--precision", "int4"], {}, {}),
        ("gptcli serve torch fp32", "fp32", [*gptcli, "--backend", "torch", "--dtype", "float32"], {}, {}),
    ]
    if prefix:
        no_cache = [*gptcli, "--backend", "onnx", "--precision", "int4", "--prefix-cache", "0"]
        rows.insert(2, ("gptcli serve onnx int4 no-prefix-cache", "int4", no_cache, {}, {}))
    for label, precision in (("F32", "fp32"), ("Q4_0", "int4")):
        model = Path(str(GGUF).format(label))
        if LLAMA_SERVER.exists() and model.exists():
            command = [str(LLAMA_SERVER), "-m", str(model), "--port", "{port}", "-np", str(parallel), "-cb"]
            command += ["-t", str(threads), "-c", str(4096 * parallel), "--host", "127.0.0.1"]
            rows.append((f"llama-server {label}", precision, command, {}, {}))
            llama_cpp = [python, "-m", "llama_cpp.server", "--model", str(model), "--port", "{port}"]
            llama_cpp += ["--n_threads", str(threads), "--n_ctx", "4096", "--host", "127.0.0.1"]
            # It runs one request at a time; by default a new request interrupts the running one, which
            # ended most responses after a few tokens at concurrency 8. Queued instead, as a client expects.
            llama_cpp += ["--interrupt_requests", "False"]
            # llama_cpp.server's own dependencies, kept out of the project's environment (see build_llamacpp.sh).
            extra = {"PYTHONPATH": str(PEERS / "serverdeps")}
            rows.append((f"llama_cpp.server {label}", precision, llama_cpp, extra, no_eos))
    return rows


def eos_ids() -> frozenset[int]:
    """The default model's end-of-sequence ids (the GGUFs are made from the same weights and vocabulary)."""
    from gptcli.config import DEFAULT_MODEL
    from gptcli.models import resolve_model
    from gptcli.tokenizer import Tokenizer

    return Tokenizer(resolve_model(DEFAULT_MODEL).path).eos_ids


def wait_ready(base_url: str, proc: subprocess.Popen, timeout: float = 600) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(base_url + "/v1/models", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


# `serve` flags that `generate` takes too, with their values: the reference runs on the same backend.
SHARED_FLAGS = ("--backend", "--precision", "--dtype", "--threads")
DECODE_RATE = re.compile(r"(\d+) new tok · decode ([0-9.]+) tok/s")


class GenerateReference:
    """`gptcli generate --stats` on the backend flags of a `gptcli serve` command: greedy, exactly `output_len`
    tokens (`ignore_eos` through a config file), one process per prompt."""

    def __init__(self, command: list[str], output_len: int, folder: Path) -> None:
        pairs = itertools.pairwise(command)
        self.flags = [part for flag, value in pairs if flag in SHARED_FLAGS for part in (flag, value)]
        self.output_len = output_len
        self.folder = folder
        self.config = folder / "ignore_eos.yaml"
        self.config.write_text("sampling:\n  ignore_eos: true\n  repetition_stop: false\n")

    def decode_rate(self, prompt: str) -> float | None:
        """generate's decode tok/s on `prompt`; None (with the reason on stderr) when it fails or stops short."""
        source = self.folder / "prompt.txt"
        source.write_text(prompt)
        argv = [sys.executable, "-m", "gptcli", "generate", *self.flags, "-c", str(self.config), "--raw", "-t", "0"]
        argv += ["-n", str(self.output_len), "--stats", "-f", str(source)]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
        found = DECODE_RATE.search(done.stderr)
        if done.returncode != 0 or not found or int(found.group(1)) != self.output_len:
            print(f"generate reference failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
            return None
        return float(found.group(2))


def interleaved_level(opts, prompts: list[str], model: str, reference: GenerateReference) -> tuple[list, float, dict]:
    """Concurrency 1, each request followed by `gptcli generate` on the same prompt (the server idle meanwhile),
    so the machine's drift reaches both alike: the results, their duration, and the reference's numbers (the
    median of each pair's 1000 / TPOT over generate's decode rate, and generate's median rate; none once a pair
    fails, while the server's requests go on)."""
    results, duration, ratios, rates = [], 0.0, [], []
    paired = True
    for prompt in prompts:
        (result,), seconds = asyncio.run(bench_serve.run_level(opts, [prompt], [], 1, model))
        results.append(result)
        duration += seconds
        rate = reference.decode_rate(prompt) if paired else None
        steps = result.output_tokens - 1
        paired = rate is not None and result.ok and steps >= 1
        if paired:
            ratios.append(1 / ((result.e2e_s - result.ttft_s) / steps) / rate)
            rates.append(rate)
    if not paired:
        return results, duration, {}
    return results, duration, {"generate_tps": statistics.median(rates), "vs_generate": statistics.median(ratios)}


def measure(
    name: str, command: list[str], env: dict[str, str], body: dict, args, rows: list[dict], number: int = 1
) -> None:
    """Run one server through every load, appending each finished cell to `rows` as it finishes (an
    interrupted run keeps them); a server that does not start is skipped. A gptcli server's concurrency-1
    cells alternate with `gptcli generate` on the same prompts (`generate_tps`, `vs_generate`). `number`: the pass."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    argv = [part.replace("{port}", str(port)) for part in command]
    log = open(REPO / ".cache" / f"serve-{name.replace(' ', '_')}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=REPO)
    scratch = tempfile.TemporaryDirectory()
    referenced = name.startswith("gptcli serve") and "--prefix-cache" not in command
    reference = GenerateReference(command, args.output_len, Path(scratch.name)) if referenced else None
    try:
        if not wait_ready(base_url, proc):
            print(f"skip {name}: did not start (see {log.name})", file=sys.stderr)
            return
        opts = argparse.Namespace(
            base_url=base_url,
            endpoint="/v1/completions",
            api_key=None,
            random_output_len=args.output_len,
            ignore_eos=True,
            extra_body=body,
            timeout=600.0,
        )
        model = bench_serve.served_model(opts)
        for input_len in args.input_len:
            for concurrency in args.concurrency:
                count = args.num_prompts or max(8, 2 * concurrency)
                seed = bench_serve.level_seed(0, input_len, concurrency)
                prompts = bench_serve.make_prompts(count + 1, input_len, seed, args.tokenizer, args.prefix_len)
                own: dict = {}
                if concurrency == 1 and reference is not None:
                    asyncio.run(bench_serve.run_level(opts, [], prompts[:1], 1, model))  # the warm-up
                    results, duration, own = interleaved_level(opts, prompts[1:], model, reference)
                else:
                    results, duration = asyncio.run(
                        bench_serve.run_level(opts, prompts[1:], prompts[:1], concurrency, model)
                    )
                row = {
                    "server": name,
                    "input_len": input_len,
                    "concurrency": concurrency,
                    "pass": number,
                    **bench_serve.summarize(results, duration),
                    **own,
                }
                rows.append(row)
                print(
                    f"{name}: input {input_len}, concurrency {concurrency}: {row['output_throughput']:.1f} tok/s, "
                    f"TTFT p99 {row['p99_ttft_ms']:.0f} ms",
                    file=sys.stderr,
                )
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        scratch.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=bench_serve.ints, default=[1, 4, 8, 16])
    parser.add_argument("--input-len", type=bench_serve.ints, default=[128, 512])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--only", help="comma-separated name fragments of the servers to run")
    parser.add_argument("--tokenizer", help="model folder: prompts of exact token counts")
    parser.add_argument("--prefix-len", type=int, default=0, help="a shared prefix of this many tokens per level")
    parser.add_argument("--quick", action="store_true", help="concurrency 1,8, input 128, 32 output tokens")
    parser.add_argument(
        "--passes", type=int, default=1, help="passes over every server, every other one in reverse order (drift)"
    )
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.input_len, args.output_len = [1, 8], [128], 32
    chosen = servers(args.threads, args.parallel, prefix=args.prefix_len > 0)
    if args.only:
        chosen = [s for s in chosen if any(part in s[0] for part in args.only.split(","))]
    from gptcli.tuning import kernel_flags

    isa = kernel_flags()
    prefix = f" | a shared {args.prefix_len}-token prefix" if args.prefix_len else ""
    print(f"cpu flags: {' '.join(isa)} | threads {args.threads} | parallel slots {args.parallel} | ignore_eos{prefix}")
    rows: list[dict] = []
    stopped = False
    precision_of = {name: precision for name, precision, *_ in chosen}
    # A stopped run (Ctrl-C, or `timeout`'s SIGTERM) still prints the table of the cells that finished.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for number in range(1, args.passes + 1):
            for name, _, command, env, body in chosen if number % 2 else chosen[::-1]:
                measure(name, command, env, body, args, rows, number)
    except KeyboardInterrupt:
        stopped = True
        print(f"stopped: the table has the {len(rows)} cells that finished", file=sys.stderr)
    header = (
        "| server | in | conc | pass | out tok/s | TTFT med/p99 ms | TPOT med ms | E2E med ms | out len "
        "| × llama-server: out tok/s, TTFT p99 | 1000/TPOT ÷ generate's decode t/s: median pair ratio |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    peer = {
        (r["input_len"], r["concurrency"], precision_of[r["server"]], r["pass"]): r
        for r in rows
        if r["server"].startswith("llama-server")
    }
    order = {name: index for index, (name, *_) in enumerate(chosen)}
    for r in sorted(rows, key=lambda r: (order[r["server"]], r["input_len"], r["concurrency"], r["pass"])):
        match = peer.get((r["input_len"], r["concurrency"], precision_of[r["server"]], r["pass"]))
        ratio = "–"
        if match and match["output_throughput"] and match["p99_ttft_ms"]:
            ratio = (
                f"{r['output_throughput'] / match['output_throughput']:.2f}, "
                f"{r['p99_ttft_ms'] / match['p99_ttft_ms']:.2f}"
            )
        own = "–"
        if r.get("vs_generate"):
            own = f"{1000 / r['median_tpot_ms']:.1f} ÷ {r['generate_tps']:.1f}: {r['vs_generate']:.2f}"
        print(
            f"| {r['server']} | {r['input_len']} | {r['concurrency']} | {r['pass']} | {r['output_throughput']:.1f} | "
            f"{r['median_ttft_ms']:.0f}/{r['p99_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} | "
            f"{r['median_e2e_ms']:.0f} | "
            f"{r['mean_output_tokens']:.0f} | {ratio} | {own} |"
        )
    return 130 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
