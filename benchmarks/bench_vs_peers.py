"""gptcli's decode and prefill beside its peers on the default model, in one run, passes interleaved (issue 17).

    .venv/bin/python benchmarks/bench_vs_peers.py [-p 512] [-n 128] [-r 3] [--threads 2] [--passes 2]
    .venv/bin/python benchmarks/bench_vs_peers.py --only "gptcli onnx,onnxruntime-genai" --passes 1

Rows (each configuration is its own process, and every pass runs all of them in turn, so drift on a shared
machine hits every row alike; pass 2 runs them in the reverse order):
- gptcli bench: onnx fp32/int8/int4, torch fp32/int8/int4 (torch in float32 activations: `--dtype float32`);
- a hand-written transformers loop in fp32 (model(ids, cache) timed around the same synthetic ids), what a
  PyTorch user would write;
- ONNX Runtime GenAI, with its own builder run on the same HF-format folder gptcli loads (fp32, int4), when
  `onnxruntime_genai` can be imported (`pip install --no-deps --target .cache/genai-peer onnxruntime-genai`;
  the script adds that folder to the child's path itself);
- llama.cpp's own `llama-bench` on GGUFs made from the same weights (F32, F16, Q8_0, Q4_0: built by
  `benchmarks/peers/build_llamacpp.sh` into .cache/peers/).
The header names the CPU and its ISA flags (a result holds for the ISA it was measured on). The ratios are
issue 17's targets, each computed within a pass (both sides ran minutes apart at most).

`--perplexity` adds what each row's weights cost in quality, since a faster "int4" may be a different model:
gptcli's and GenAI's perplexity on the first 300 tokens of tests/data/holdout.txt in one window (the same
logits arithmetic for both), and llama.cpp's from its own `llama-perplexity` (its method: 128-token chunks,
the second half of each scored), each against its own fp32/F32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / ".cache" / "peers"
GENAI_PATH = REPO / ".cache" / "genai-peer"
GENAI_MODELS = REPO / ".cache" / "genai-models"
MODEL = "smollm2-135m-instruct"
HOLDOUT = REPO / "tests" / "data" / "holdout.txt"
PPL_TOKENS = 300

# (who, precision) over (who, precision): issue 17's targets.
TARGETS = [
    (("gptcli onnx", "fp32"), ("onnxruntime-genai", "fp32"), 1.1),
    (("gptcli onnx", "int4"), ("onnxruntime-genai", "int4"), 1.1),
    (("gptcli onnx", "int4"), ("llama.cpp", "Q4_0"), 1.1),
    (("gptcli onnx", "int8"), ("llama.cpp", "Q8_0"), 1.0),
    (("gptcli torch", "int8"), ("gptcli torch", "fp32"), 2.5),
    (("gptcli torch", "fp32"), ("transformers loop", "fp32"), None),
]


@dataclass
class Row:
    who: str
    precision: str
    decode: list[float] = field(default_factory=list)  # t/s, one per pass (nan where it failed)
    prefill: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- children (each runs in its own process)


def transformers_child(folder: str, n_prompt: int, n_gen: int, reps: int, threads: int) -> dict:
    """The peer every PyTorch user writes: prefill and decode with transformers' own forward, fp32."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)

    def run(n_p: int, n_g: int) -> float:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            if n_p == 0:
                model(input_ids=torch.tensor([[1]]), past_key_values=cache, use_cache=True)
            ids = torch.tensor([rng.integers(0, model.config.vocab_size, n_p).tolist()]) if n_p else None
            steps = rng.integers(0, model.config.vocab_size, n_g).tolist()
            start = time.perf_counter()
            if ids is not None:
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for token in steps:
                model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    return timed_tests(run, n_prompt, n_gen, reps)


def genai_child(folder: str, precision: str, n_prompt: int, n_gen: int, reps: int, threads: int) -> dict:
    """ONNX Runtime GenAI on its own builder's export of the same folder: append_tokens / generate_next_token."""
    import numpy as np
    import onnxruntime_genai as og

    out = genai_export(Path(folder), precision)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        options["intra_op_num_threads"] = threads
        config_path.write_text(json.dumps(config, indent=2))
    og_config = og.Config(str(out))
    og_config.clear_providers()
    model = og.Model(og_config)
    vocab = int(config["model"]["vocab_size"])
    rng = np.random.default_rng(0)

    def run(n_p: int, n_g: int) -> float:
        params = og.GeneratorParams(model)
        length = max(n_p, 1) + n_g
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(model, params)
        ids = rng.integers(0, vocab, max(n_p, 1)).astype(np.int32)
        if n_p == 0:
            gen.append_tokens(ids)
        start = time.perf_counter()
        if n_p:
            gen.append_tokens(ids)
        for _ in range(n_g):
            gen.generate_next_token()
        return time.perf_counter() - start

    return timed_tests(run, n_prompt, n_gen, reps)


def genai_perplexity_child(folder: str, precision: str) -> dict:
    """GenAI's export scored with a plain ORT session: every position's logits of one window, gptcli's arithmetic."""
    import numpy as np
    import onnxruntime as ort
    from profile_ops import empty_past, feeds

    from gptcli.evaluate import log_probs
    from gptcli.tokenizer import Tokenizer

    ids = Tokenizer(Path(folder)).encode(HOLDOUT.read_text())[:PPL_TOKENS]
    model_path = genai_export(Path(folder), precision) / "model.onnx"
    session = ort.InferenceSession(str(model_path))
    logits = session.run(["logits"], feeds(session, ids, empty_past(session, model_path), 0))[0][0]
    nll = -log_probs(logits[:-1], np.array(ids[1:])).mean()
    return {"perplexity": float(np.exp(nll))}


def genai_export(folder: Path, precision: str) -> Path:
    """GenAI's builder run once on the folder (fp32 or int4, CPU), cached under .cache/genai-models/."""
    out = GENAI_MODELS / f"{folder.name}-{precision}"
    if not (out / "genai_config.json").is_file():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out)]
        cmd += ["-p", precision, "-e", "cpu", "-c", str(GENAI_MODELS / "hf-cache")]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def timed_tests(run, n_prompt: int, n_gen: int, reps: int) -> dict:
    """ppN and tgN t/s, median of `reps` after a short warm-up, as llama-bench names them."""
    out = {}
    for name, (n_p, n_g) in {f"pp{n_prompt}": (n_prompt, 0), f"tg{n_gen}": (0, n_gen)}.items():
        run(min(n_p, 16), min(n_g, 4))  # warm-up
        out[name] = statistics.median((n_p + n_g) / run(n_p, n_g) for _ in range(reps))
    return out


# ---------------------------------------------------------------- runners (in the parent)


def child(kind: str, args: argparse.Namespace, *extra: str) -> dict | None:
    path = [str(REPO / "src")] + ([str(GENAI_PATH)] if kind.startswith("genai") else [])
    cmd = [sys.executable, __file__, "--child", kind, *extra, *common_flags(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(path)})
    if proc.returncode != 0:
        print(f"  {kind} {' '.join(extra)} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def common_flags(args: argparse.Namespace) -> list[str]:
    return ["-p", str(args.p), "-n", str(args.n), "-r", str(args.r), "--threads", str(args.threads)]


def gptcli_bench(backend: str, precision: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, "-m", "gptcli", "bench", "-b", backend, "--precision", precision, "--device", "cpu"]
    cmd += ["-o", "json", *common_flags(args)]
    if backend == "torch":
        cmd += ["--dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        print(f"  gptcli bench {backend} {precision} failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return {r["test"]: r["tokens_per_s"] for r in json.loads(proc.stdout)["results"]}


def llama_bench_binary() -> str | None:
    built = PEERS / "llama.cpp-build" / "bin" / "llama-bench"
    return str(built) if built.is_file() else shutil.which("llama-bench")


def llama_bench(gguf: Path, args: argparse.Namespace) -> dict | None:
    binary = llama_bench_binary()
    cmd = [binary, "-m", str(gguf), "-p", str(args.p), "-n", str(args.n), "-r", str(args.r)]
    cmd += ["-t", str(args.threads), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  llama-bench {gguf.name} failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    out = {}
    for row in json.loads(proc.stdout):
        out[f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"] = row["avg_ts"]
    return out


def gptcli_perplexity(backend: str, precision: str) -> float | None:
    cmd = [sys.executable, "-m", "gptcli", "eval", "perplexity", str(HOLDOUT), "-b", backend, "--precision", precision]
    cmd += ["-n", str(PPL_TOKENS), "--json", "--device", "cpu"] + (["--dtype", "float32"] if backend == "torch" else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    return json.loads(proc.stdout)["perplexity"] if proc.returncode == 0 else None


def llama_perplexity(gguf: Path, threads: int) -> float | None:
    binary = PEERS / "llama.cpp-build" / "bin" / "llama-perplexity"
    if not binary.is_file():
        return None
    cmd = [str(binary), "-m", str(gguf), "-f", str(HOLDOUT), "-c", "128", "-t", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if "Final estimate: PPL =" in line:
            return float(line.split("PPL =")[1].split()[0])
    return None


def perplexities(rows: dict, folder: Path, args: argparse.Namespace) -> dict[tuple[str, str], float | None]:
    out: dict[tuple[str, str], float | None] = {}
    for who, precision in rows:
        print(f"perplexity: {who} {precision} ...", file=sys.stderr)
        if who.startswith("gptcli "):
            out[who, precision] = gptcli_perplexity(who.split()[1], precision)
        elif who == "onnxruntime-genai":
            result = child("genai-perplexity", args, str(folder), precision)
            out[who, precision] = result and result["perplexity"]
        elif who == "llama.cpp":
            out[who, precision] = llama_perplexity(PEERS / "gguf" / f"{MODEL}-{precision}.gguf", args.threads)
    return out


def configurations(args: argparse.Namespace, folder: Path) -> list[tuple[str, str, object]]:
    """(who, precision, a callable giving {test: t/s} or None) for every peer this machine has."""
    configs: list[tuple[str, str, object]] = []
    for precision in ("fp32", "int8", "int4"):
        configs.append(("gptcli onnx", precision, lambda p=precision: gptcli_bench("onnx", p, args)))
    for precision in ("fp32", "int8", "int4"):
        configs.append(("gptcli torch", precision, lambda p=precision: gptcli_bench("torch", p, args)))
    configs.append(("transformers loop", "fp32", lambda: child("transformers", args, str(folder))))
    probe = subprocess.run(
        [sys.executable, "-c", "import onnxruntime_genai"],
        env={**os.environ, "PYTHONPATH": str(GENAI_PATH)},
        capture_output=True,
    )
    if probe.returncode == 0:
        for precision in ("fp32", "int4"):
            configs.append(("onnxruntime-genai", precision, lambda p=precision: child("genai", args, str(folder), p)))
    else:
        print("onnxruntime-genai is not importable: no GenAI rows (see this script's docstring)", file=sys.stderr)
    if llama_bench_binary():
        for quant in ("F32", "F16", "Q8_0", "Q4_0"):
            gguf = PEERS / "gguf" / f"{MODEL}-{quant}.gguf"
            if gguf.is_file():
                configs.append(("llama.cpp", quant, lambda g=gguf: llama_bench(g, args)))
    else:
        print("llama-bench not built: no llama.cpp rows (benchmarks/peers/build_llamacpp.sh)", file=sys.stderr)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        configs = [c for c in configs if any(c[0] == w or f"{c[0]} {c[1]}" == w for w in wanted)]
    return configs


def isa_flags() -> str:
    from gptcli.tuning import kernel_flags

    return " ".join(kernel_flags()) or "none of gptcli.tuning.KERNEL_FLAGS"


def per_pass(values: list[float]) -> str:
    return " / ".join("–" if v != v else f"{v:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", type=int, default=512, help="prefill test size (ppN)")
    parser.add_argument("-n", type=int, default=128, help="decode test length (tgN)")
    parser.add_argument("-r", type=int, default=3, help="repetitions inside each run (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=2, help="interleaved passes over every configuration")
    parser.add_argument("--only", help="comma-separated rows to keep: 'gptcli onnx', 'llama.cpp Q4_0', ...")
    parser.add_argument("--json", type=Path, help="also write the rows and ratios here")
    parser.add_argument("--perplexity", action="store_true", help="add each row's perplexity (see the docstring)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "transformers":
            result = transformers_child(rest[0], args.p, args.n, args.r, args.threads)
        elif kind == "genai-perplexity":
            result = genai_perplexity_child(rest[0], rest[1])
        else:
            result = genai_child(rest[0], rest[1], args.p, args.n, args.r, args.threads)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(REPO / "src"))
    from gptcli.bench.roofline import cpu_model
    from gptcli.models import resolve_model

    folder = resolve_model(MODEL, notify=lambda m: print(m, file=sys.stderr)).path
    configs = configurations(args, folder)
    rows = {(who, precision): Row(who, precision) for who, precision, _ in configs}
    pp, tg = f"pp{args.p}", f"tg{args.n}"
    for number in range(args.passes):
        order = configs if number % 2 == 0 else configs[::-1]
        for who, precision, measure in order:
            print(f"pass {number + 1}: {who} {precision} ...", file=sys.stderr)
            result = measure() or {}
            rows[who, precision].decode.append(result.get(tg, float("nan")))
            rows[who, precision].prefill.append(result.get(pp, float("nan")))

    print(f"\n{cpu_model()}, {os.cpu_count()} CPUs, {args.threads} threads; ISA flags: {isa_flags()}")
    print(f"{MODEL}, {tg} decode and {pp} prefill t/s, median of {args.r} each, {args.passes} interleaved passes\n")
    print(f"| runtime | precision | decode {tg} t/s (per pass) | prefill {pp} t/s (per pass) |")
    print("|---|---|---|---|")
    for row in rows.values():
        print(f"| {row.who} | {row.precision} | {per_pass(row.decode)} | {per_pass(row.prefill)} |")
    ratios = []
    print("\n| target | decode ratio (per pass) | goal |")
    print("|---|---|---|")
    for ours, theirs, goal in TARGETS:
        if ours not in rows or theirs not in rows:
            continue
        values = [a / b for a, b in zip(rows[ours].decode, rows[theirs].decode, strict=True)]
        met = "" if goal is None else (" met" if all(v >= goal for v in values) else " **not met**")
        goal_text = "–" if goal is None else f"≥ {goal}×{met}"
        print(f"| {' '.join(ours)} / {' '.join(theirs)} | {' / '.join(f'{v:.2f}×' for v in values)} | {goal_text} |")
        ratios.append({"ours": ours, "theirs": theirs, "goal": goal, "per_pass": values})
    quality = perplexities(rows, folder, args) if args.perplexity else {}
    if quality:
        print("\n| runtime | precision | perplexity | vs its own fp32 |")
        print("|---|---|---:|---:|")
        for who, precision in rows:
            if (who, precision) not in quality:
                continue
            value = quality[who, precision]
            base = quality.get((who, "F32" if who == "llama.cpp" else "fp32"))
            ratio = f"{100 * (value / base - 1):+.1f} %" if value and base else "–"
            print(f"| {who} | {precision} | {'–' if value is None else f'{value:.2f}'} | {ratio} |")
        print(f"(gptcli and GenAI: the first {PPL_TOKENS} tokens of {HOLDOUT.name}, one window; llama.cpp: its own")
        print(" llama-perplexity on the same file, -c 128; compare each with its own fp32 row)")
    if args.json:
        payload = {
            "cpu": cpu_model(),
            "isa_flags": isa_flags(),
            "threads": args.threads,
            "rows": [vars(row) for row in rows.values()],
            "ratios": ratios,
            "perplexity": [{"who": k[0], "precision": k[1], "perplexity": v} for k, v in quality.items()],
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
