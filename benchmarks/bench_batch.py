"""Batched decoding: gptcli's engine at 1, 2, 4 and 8 parallel sequences against its peers, in one run.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_batch.py [--tokens 128] [--rounds 3] [--threads 2] [--quick]

Rows (default model, CPU, greedy, a fixed number of new tokens with EOS ignored):
- gptcli torch fp32, onnx fp32, onnx int4: `Engine(backend, tokenizer, EngineLimits(max_running=npl))` and
  `run_all` over the first npl of eight real chat prompts;
- transformers `generate` (fp32): the same prompts left-padded into one batch, the way a PyTorch user batches;
- llama.cpp's own `llama-batched-bench` on F32 and Q4_0 GGUFs of the same weights (synthetic tokens, prompts
  of the gptcli prompts' mean length), when `benchmarks/peers/build_llamacpp.sh` has built them.
Definitions follow llama-batched-bench: PP t/s = prompt tokens of all sequences / prefill time; TG t/s =
npl x generated tokens / generation time (the first token comes from the prefill, so each sequence has
tokens - 1 decode steps). gptcli's times are wall clock around the engine (sampling and detokenizing included).
Rounds alternate the runtimes (in a rotating order), so drift on a shared machine hits all alike; the table
shows medians. It also checks that each gptcli sequence's greedy tokens in a batch equal its tokens alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

PEERS = REPO / ".cache" / "peers"
BATCHED_BENCH = PEERS / "llama.cpp-build" / "bin" / "llama-batched-bench"
GGUF_DIR = PEERS / "gguf"
PROMPTS = (
    "Explain in simple words why the sky is blue during the day and red at sunset.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Give me three tips for keeping a small vegetable garden healthy through a dry summer.",
    "What is the difference between a list and a tuple in Python? Show a small example of each.",
    "Describe how a bicycle's gears make it easier to ride up a hill.",
    "Write a polite email to a neighbour asking them to keep their dog quiet at night.",
    "Summarise the water cycle for a ten-year-old, in one paragraph.",
    "Suggest a simple weekly plan for someone who wants to start running, with rest days.",
)
# Which gptcli row is compared with which peer row (matched precision).
PEER_OF = {
    "gptcli torch fp32": "transformers generate fp32",
    "gptcli onnx fp32": "llama.cpp F32",
    "gptcli onnx int4": "llama.cpp Q4_0",
}
# Issue 13's targets for the aggregate TG at 8 sequences over 1.
SPEEDUP_TARGETS = {"gptcli torch fp32": 4.0, "gptcli onnx fp32": 3.0, "gptcli onnx int4": 2.0}
PEER_TARGETS = {"gptcli torch fp32": 1.5}


@dataclass
class Measure:
    """One run at one npl: prompt-processing and token-generation tokens and seconds (all sequences)."""

    pp_tokens: int
    pp_s: float
    tg_tokens: int
    tg_s: float
    backend_share: float | None = None  # of the wall time, the share spent in backend steps (gptcli only)

    @property
    def pp_tps(self) -> float:
        return self.pp_tokens / self.pp_s if self.pp_s > 0 else float("nan")

    @property
    def tg_tps(self) -> float:
        return self.tg_tokens / self.tg_s if self.tg_s > 0 else float("nan")


@dataclass
class StepTiming:
    start: float
    end: float
    prefill_tokens: int
    decode_tokens: int


class TimedBackend:
    """A backend wrapper that times every batched step and counts its prefill and decode tokens."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.info = inner.info
        self.steps: list[StepTiming] = []

    def new_cache(self):
        return self.inner.new_cache()

    def forward(self, ids, cache):
        return self.inner.forward(ids, cache)

    def truncate(self, cache, length: int):
        return self.inner.truncate(cache, length)

    def release(self, cache) -> None:
        from gptcli.backends.base import release_cache

        release_cache(self.inner, cache)

    def step(self, batch):
        from gptcli.backends.base import batched_step

        # Counted before the step: caches grow in place. An empty cache or several ids is a prompt chunk.
        prefill = sum(len(ids) for ids, cache in batch if cache.length == 0 or len(ids) > 1)
        decode = sum(len(ids) for ids, _ in batch) - prefill
        start = time.perf_counter()
        out = batched_step(self.inner, batch)
        self.steps.append(StepTiming(start, time.perf_counter(), prefill, decode))
        return out


@dataclass
class GptcliRuntime:
    """One gptcli backend/precision, driven through the engine."""

    label: str
    backend: TimedBackend
    tokenizer: object
    alone: dict[int, tuple[int, ...]] = field(default_factory=dict)  # prompt index -> greedy tokens alone
    mismatches: dict[int, list[str]] = field(default_factory=dict)  # npl -> "prompt i from token j"

    def generate(self, prompts: Sequence[list[int]], npl: int, n_gen: int) -> tuple[Measure, list[tuple[int, ...]]]:
        from gptcli.config import SamplingConfig
        from gptcli.decoding import Finished
        from gptcli.engine import Engine, EngineLimits, run_all

        params = SamplingConfig(temperature=0.0, max_tokens=n_gen)
        engine = Engine(self.backend, self.tokenizer, EngineLimits(max_running=npl))
        self.backend.steps.clear()
        tokens: dict[int, tuple[int, ...]] = {}
        start = time.perf_counter()
        for index, event in run_all(engine, [(ids, params) for ids in prompts]):
            if isinstance(event, Finished):
                tokens[index] = event.token_ids
        end = time.perf_counter()
        steps = self.backend.steps
        mixed = [s for s in steps if s.prefill_tokens and s.decode_tokens]
        if mixed:
            print(f"warning: {self.label}: {len(mixed)} steps mixed prefill and decode", file=sys.stderr)
        prefill_end = max(s.end for s in steps if s.prefill_tokens)
        in_steps = sum(s.end - s.start for s in steps)
        measure = Measure(
            pp_tokens=sum(s.prefill_tokens for s in steps),
            pp_s=prefill_end - start,
            tg_tokens=sum(s.decode_tokens for s in steps),
            tg_s=end - prefill_end,
            backend_share=in_steps / (end - start),
        )
        return measure, [tokens[i] for i in range(len(prompts))]

    def check_alone(self, prompts: Sequence[list[int]], n_gen: int) -> None:
        """Each prompt alone (untimed; it also warms the runtime up): the reference for the batched tokens."""
        for index, ids in enumerate(prompts):
            _, (tokens,) = self.generate([ids], 1, n_gen)
            self.alone[index] = tokens

    def warm_up(self, prompts: Sequence[list[int]]) -> None:
        self.generate(prompts[:1], 1, 4)

    def run(self, prompts: Sequence[list[int]], npl: int, n_gen: int) -> Measure:
        measure, outputs = self.generate(prompts[:npl], npl, n_gen)
        for index, tokens in enumerate(outputs):
            reference = self.alone.get(index)
            if reference is not None and tokens != reference:
                first = next((j for j, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b), None)
                where = f"token {first}" if first is not None else f"length {len(tokens)} vs {len(reference)}"
                note = f"prompt {index} from {where}"
                if note not in self.mismatches.setdefault(npl, []):
                    self.mismatches[npl].append(note)
        return measure


class TransformersRuntime:
    """The peer a PyTorch user writes: `generate` on the prompts left-padded into one batch, greedy."""

    label = "transformers generate fp32"

    def __init__(self, folder: Path, pad_id: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # a fixed number of new tokens, like the other rows
        self.pad_id = pad_id
        self.outputs: dict[int, list[tuple[int, ...]]] = {}

    def warm_up(self, prompts: Sequence[list[int]]) -> None:
        self.run(prompts, 1, 4)  # its npl-1 outputs are replaced by the timed run's

    def run(self, prompts: Sequence[list[int]], npl: int, n_gen: int) -> Measure:
        from transformers import LogitsProcessor, LogitsProcessorList

        torch = self.torch
        batch = prompts[:npl]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        seen: list[float] = []

        class StepClock(LogitsProcessor):  # called once per forward, right after it: the step boundaries
            def __call__(self, input_ids, scores):
                seen.append(time.perf_counter())
                return scores

        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=mask,
                max_new_tokens=n_gen,
                do_sample=False,
                pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList([StepClock()]),
            )
        self.outputs[npl] = [tuple(row[width:].tolist()) for row in out]
        return Measure(
            pp_tokens=sum(len(ids) for ids in batch),
            pp_s=seen[0] - start,
            tg_tokens=npl * (len(seen) - 1),
            tg_s=seen[-1] - seen[0],
        )


@dataclass
class LlamaBatchedBench:
    """llama.cpp's own llama-batched-bench on one GGUF; one process covers every npl."""

    label: str
    gguf: Path
    threads: int
    results: dict[int, list[Measure]] = field(default_factory=dict)

    def run_all_npl(self, npls: Sequence[int], n_prompt: int, n_gen: int) -> None:
        context = max(npls) * (n_prompt + n_gen) + 64
        npl_list, threads = ",".join(map(str, npls)), self.threads
        flags = f"-c {context} -b 2048 -ub 512 -npp {n_prompt} -ntg {n_gen} -npl {npl_list} -t {threads} -tb {threads}"
        cmd = [str(BATCHED_BENCH), "-m", str(self.gguf), *flags.split(), "--output-format", "jsonl"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"warning: {self.label} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return
        for line in (proc.stdout + "\n" + proc.stderr).splitlines():
            if line.startswith("{") and '"speed_tg"' in line:
                row = json.loads(line)
                pl = int(row["pl"])
                measure = Measure(pl * int(row["pp"]), float(row["t_pp"]), pl * int(row["tg"]), float(row["t_tg"]))
                self.results.setdefault(pl, []).append(measure)


def cpu_isa() -> str:
    """The ISA flags that decide which kernels run (gptcli.tuning's list), each marked present or absent."""
    from gptcli.hardware import cpu_flags
    from gptcli.tuning import KERNEL_FLAGS

    flags = cpu_flags()
    if not flags:
        return "unknown"
    return " ".join(f"{flag}{'+' if flag in flags else '-'}" for flag in KERNEL_FLAGS)


def median_measure(runs: list[Measure]) -> tuple[float, float, float | None]:
    """(PP t/s, TG t/s, backend share): medians over rounds."""
    shares = [m.backend_share for m in runs if m.backend_share is not None]
    return (
        statistics.median(m.pp_tps for m in runs),
        statistics.median(m.tg_tps for m in runs),
        statistics.median(shares) if shares else None,
    )


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}{suffix}"


def render(
    results: dict[str, dict[int, list[Measure]]], npls: Sequence[int], checks: dict[str, dict[int, str]]
) -> tuple[list[str], dict]:
    """The markdown table and the summary lines (targets), plus the numbers as a dict for --json."""
    medians = {
        label: {npl: median_measure(runs) for npl, runs in by_npl.items() if runs} for label, by_npl in results.items()
    }
    lines = [
        "| runtime | npl | PP t/s | TG t/s | TG/seq | TG ×npl1 | in steps | peer | PP ×peer | TG ×peer | = alone |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, by_npl in medians.items():
        base_tg = by_npl.get(1, (None, None, None))[1]
        peer = PEER_OF.get(label)
        for npl in npls:
            if npl not in by_npl:
                continue
            pp, tg, share = by_npl[npl]
            peer_pp, peer_tg, _ = medians.get(peer, {}).get(npl, (None, None, None))
            lines.append(
                f"| {label} | {npl} | {fmt(pp)} | {fmt(tg)} | {fmt(tg / npl)} | "
                f"{fmt(tg / base_tg if base_tg else None, 2)} | {fmt(share * 100 if share else None, 0, ' %')} | "
                f"{peer or '–'} | {fmt(pp / peer_pp if peer_pp else None, 2)} | "
                f"{fmt(tg / peer_tg if peer_tg else None, 2)} | {checks.get(label, {}).get(npl, '–')} |"
            )
    top = max(npls)
    summary = []
    for label, target in SPEEDUP_TARGETS.items():
        by_npl = medians.get(label, {})
        if 1 in by_npl and top in by_npl:
            ratio = by_npl[top][1] / by_npl[1][1]
            summary.append(
                f"{label}: TG at {top} / at 1 = {ratio:.2f} (target ≥ {target:g}: "
                f"{'met' if ratio >= target else 'not met'})"
            )
    for label, peer in PEER_OF.items():
        ours, theirs = medians.get(label, {}).get(top), medians.get(peer, {}).get(top)
        if ours and theirs:
            ratio = ours[1] / theirs[1]
            target = PEER_TARGETS.get(label)
            verdict = f" (target ≥ {target:g}: {'met' if ratio >= target else 'not met'})" if target else ""
            summary.append(f"{label} vs {peer}: TG at {top} = {ratio:.2f}×{verdict}")
    ours, theirs = medians.get("gptcli torch fp32", {}).get(top), medians.get("llama.cpp F32", {}).get(top)
    if ours and theirs:
        summary.append(f"gptcli torch fp32 vs llama.cpp F32: TG at {top} = {ours[1] / theirs[1]:.2f}×")
    numbers = {
        label: {str(npl): {"pp_tps": v[0], "tg_tps": v[1], "backend_share": v[2]} for npl, v in by_npl.items()}
        for label, by_npl in medians.items()
    }
    legend = (
        "PP, TG: aggregate t/s over all sequences (medians over rounds); TG/seq = TG / npl; in steps: share of "
        "gptcli's wall time inside backend steps; = alone: batched greedy tokens equal each prompt's tokens alone"
    )
    return [*lines, "", legend, "", *summary], numbers


RUNTIMES = ("torch-fp32", "onnx-fp32", "onnx-int4", "transformers", "llamacpp")


def load_runtimes(args: argparse.Namespace, folder: Path, tokenizer, log: Callable[[str], None]):
    """The gptcli rows, the transformers peer and the llama.cpp peers that were asked for (and are there)."""
    from gptcli.backends.base import LoadOptions, get_backend_class
    from gptcli.config import DEFAULT_MODEL

    wanted = set(args.runtimes.split(","))
    gptcli_rows: list[GptcliRuntime] = []
    for key, backend_name, precision in (
        ("torch-fp32", "torch", "fp32"),
        ("onnx-fp32", "onnx", "fp32"),
        ("onnx-int4", "onnx", "int4"),
    ):
        if key in wanted:
            log(f"loading gptcli {backend_name} {precision}")
            options = LoadOptions(device="cpu", dtype="float32", precision=precision, threads=args.threads)
            backend = get_backend_class(backend_name).load(folder, options)
            gptcli_rows.append(GptcliRuntime(f"gptcli {backend_name} {precision}", TimedBackend(backend), tokenizer))
    hf = None
    if "transformers" in wanted:
        log("loading transformers")
        hf = TransformersRuntime(folder, pad_id=min(tokenizer.eos_ids, default=0))
    llama_rows: list[LlamaBatchedBench] = []
    if "llamacpp" in wanted:
        for quant in ("F32", "Q4_0"):
            gguf = GGUF_DIR / f"{DEFAULT_MODEL}-{quant}.gguf"
            if BATCHED_BENCH.is_file() and gguf.is_file():
                llama_rows.append(LlamaBatchedBench(f"llama.cpp {quant}", gguf, args.threads))
            else:
                log(f"skipping llama.cpp {quant}: run benchmarks/peers/build_llamacpp.sh first")
    return gptcli_rows, hf, llama_rows


def greedy_checks(gptcli_rows: list[GptcliRuntime], hf: TransformersRuntime | None, npls: Sequence[int]):
    """Per runtime and npl: do the batched greedy tokens equal each prompt's tokens alone?"""
    checks: dict[str, dict[int, str]] = {}
    for row in gptcli_rows:
        checks[row.label] = {
            npl: ("yes" if not row.mismatches.get(npl) else "no: " + "; ".join(row.mismatches[npl])) for npl in npls
        }
    reference = next((row for row in gptcli_rows if row.label.endswith("fp32")), None)
    if hf is not None and reference is not None:  # transformers' padded batch against gptcli fp32 alone
        checks[hf.label] = {
            npl: f"{sum(t == reference.alone[i] for i, t in enumerate(outs))}/{len(outs)} = {reference.label} alone"
            for npl, outs in hf.outputs.items()
            if npl in npls
        }
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per sequence (EOS ignored)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--npl", default="1,2,4,8", help="parallel sequences to test, comma-separated")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated, from the default")
    parser.add_argument("--quick", action="store_true", help="a short check: 16 tokens, 1 round")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.rounds = 16, 1
    npls = sorted({int(n) for n in args.npl.split(",")})
    unknown = set(args.runtimes.split(",")) - set(RUNTIMES)
    if unknown:
        parser.error(f"unknown --runtimes {', '.join(sorted(unknown))}: choose from {', '.join(RUNTIMES)}")
    if max(npls) > len(PROMPTS) or min(npls) < 1:
        parser.error(f"--npl takes 1 to {len(PROMPTS)} (there are {len(PROMPTS)} prompts)")

    import torch

    from gptcli.bench.environment import environment
    from gptcli.config import DEFAULT_MODEL
    from gptcli.models import resolve_model
    from gptcli.prompts import encode_prompt
    from gptcli.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    folder = resolve_model(DEFAULT_MODEL, notify=log).path
    tokenizer = Tokenizer(folder)
    prompts = [encode_prompt(tokenizer, text).ids for text in PROMPTS]
    gptcli_rows, hf, llama_rows = load_runtimes(args, folder, tokenizer, log)
    tokenizer.eos_ids = frozenset()  # a fixed number of new tokens: the decoder never sees an end-of-sequence

    n_prompt = round(statistics.mean(len(ids) for ids in prompts[: max(npls)]))
    env = environment()
    native = ", ".join(f"{r.label}: {'native' if hasattr(r.backend.inner, 'step') else 'looping'}" for r in gptcli_rows)
    print(f"# bench_batch: {DEFAULT_MODEL}, {args.threads} threads, {args.tokens} new tokens, {args.rounds} rounds")
    print(f"cpu: {env['cpu']} ({env['cpus']} usable) | isa: {cpu_isa()} | commit {env['git_commit']}")
    print(f"torch {env['torch']} | onnxruntime {env['onnxruntime']} | transformers {env['transformers']}")
    print(f"batched step: {native or '–'}")
    print(f"prompt tokens: {[len(ids) for ids in prompts]} (llama-batched-bench: -npp {n_prompt}, synthetic ids)")
    print()

    for row in gptcli_rows:
        log(f"{row.label}: each prompt alone (warm-up and greedy reference)")
        row.check_alone(prompts, args.tokens)

    order = [*gptcli_rows, hf, *llama_rows]  # the table's row order
    results: dict[str, dict[int, list[Measure]]] = {runtime.label: {} for runtime in order if runtime}

    def sweep(runtime: GptcliRuntime | TransformersRuntime) -> None:
        # Untimed first: the runtime that ran before may leave threads spinning on the cores (an idle ONNX
        # Runtime session's worker spins for tens of ms: a step of one fp32 session right after another's
        # took 50 ms instead of 22), which slowed this runtime's npl-1 row and flattered its TG x npl1.
        runtime.warm_up(prompts)
        for npl in npls:
            results.setdefault(runtime.label, {}).setdefault(npl, []).append(runtime.run(prompts, npl, args.tokens))

    runners: list[Callable[[], None]] = [partial(sweep, runtime) for runtime in [*gptcli_rows, hf] if runtime]
    for bench in llama_rows:
        results[bench.label] = bench.results
        runners.append(partial(bench.run_all_npl, npls, n_prompt, args.tokens))
    for round_index in range(args.rounds):
        log(f"round {round_index + 1}/{args.rounds}")
        shift = round_index % len(runners)
        for runner in runners[shift:] + runners[:shift]:  # a rotating order: no runtime always goes first
            runner()

    lines, numbers = render(results, npls, greedy_checks(gptcli_rows, hf, npls))
    print("\n".join(lines))
    if args.json:
        payload = {"environment": env, "args": {**vars(args), "json": str(args.json)}, "results": numbers}
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
