"""Where a decode step's time goes, op by op, in any decoder ONNX graph (gptcli's export or GenAI's builder's).

    .venv/bin/python benchmarks/profile_ops.py ~/.cache/gptcli/onnx/smollm2-135m-instruct-int4-cpu-*/model.onnx
    .venv/bin/python benchmarks/profile_ops.py .cache/genai-models/smollm2-135m-instruct-int4/model.onnx --threads 2

Runs one sequence through ONNX Runtime's own profiler (a plain session, numpy feeds, the KV cache grown by
feeding `present.*` back as `past_key_values.*`), a short prompt then `--steps` decode steps, and prints per
op type: ms a step, the bytes of constant weights its nodes read a step (the KV cache for attention), the
rate that makes, and that rate as a share of the machine's measured read bandwidth (`gptcli bench`'s figure,
cached; `--bandwidth` overrides). "other" is the session's time outside any node's kernel.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import uses_external_data

from gptcli.export.native_ops import INT4_OP_DOMAIN

NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(float16)": np.float16,
}
# Ops that read one row of their constant tables a token (an embedding; attention's cos/sin caches), not all.
ROW_READS = {"Gather", "GatherBlockQuantized", "GroupQueryAttention"}


def initializer_bytes(model: onnx.ModelProto) -> dict[str, int]:
    sizes = {}
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            sizes[tensor.name] = int({e.key: e.value for e in tensor.external_data}.get("length", 0))
        else:
            sizes[tensor.name] = len(tensor.raw_data) or int(np.prod(tensor.dims)) * 4
    return sizes


def node_weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    sizes = initializer_bytes(model)
    return {
        node.name: sum(sizes.get(name, 0) for name in node.input)
        for node in model.graph.node
        if node.op_type not in ROW_READS
    }


def feeds(session: ort.InferenceSession, ids: list[int], past: dict[str, np.ndarray], kv_len: int) -> dict:
    out = {}
    for arg in session.get_inputs():
        dtype = NP_TYPES[arg.type]
        if arg.name == "input_ids":
            out[arg.name] = np.array([ids], dtype=dtype)
        elif arg.name == "attention_mask":
            out[arg.name] = np.ones((1, kv_len + len(ids)), dtype=dtype)
        elif arg.name == "position_ids":
            out[arg.name] = np.arange(kv_len, kv_len + len(ids), dtype=dtype)[None, :]
        elif arg.name == "logits_to_keep":
            out[arg.name] = np.array([1], dtype=dtype)
        elif arg.name.startswith("past_key_values"):
            out[arg.name] = past[arg.name]
        else:
            raise SystemExit(f"do not know how to feed input {arg.name!r}")
    return out


def empty_past(session: ort.InferenceSession, model_path: Path) -> dict[str, np.ndarray]:
    """Zero-length past keys and values; a head size the graph leaves symbolic (GenAI's) comes from the
    genai_config.json beside it."""
    past = {}
    for arg in session.get_inputs():
        if arg.name.startswith("past_key_values"):
            heads, dim = arg.shape[1], arg.shape[3]
            if not isinstance(dim, int):
                config = model_path.parent / "genai_config.json"
                if not config.is_file():
                    raise SystemExit(f"{arg.name} has a symbolic head size and there is no {config}")
                dim = int(json.loads(config.read_text())["model"]["decoder"]["head_size"])
            past[arg.name] = np.zeros((1, heads, 0, dim), dtype=NP_TYPES[arg.type])
    return past


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before the decode steps")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--bandwidth", type=float, help="GB/s (default: gptcli bench's cached measurement)")
    parser.add_argument("--by-node", action="store_true", help="group by node name (layer numbers merged), not op type")
    args = parser.parse_args()

    model = onnx.load(args.model, load_external_data=False)
    weights = node_weight_bytes(model)
    op_of = {node.name: node.op_type for node in model.graph.node}
    profile_dir = tempfile.mkdtemp(prefix="gptcli-profile-")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(profile_dir) / "ort")
    options.log_severity_level = 3
    if any(node.domain == INT4_OP_DOMAIN for node in model.graph.node):  # gptcli's Int4MatMul: its library
        from gptcli.backends.int4_native import onnx_op_library

        options.register_custom_ops_library(str(onnx_op_library()))
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    kv_names = [o.name for o in session.get_outputs() if o.name.startswith("present")]
    past = empty_past(session, args.model)
    rng = np.random.default_rng(0)
    kv_len = 0
    windows = []
    for step in range(args.steps + 8):  # the first 8 decode steps are a warm-up
        ids = rng.integers(0, 49152, args.prompt if step == 0 else 1).tolist()
        outputs = session.run(kv_names, feeds(session, ids, past, kv_len))
        past = {
            name.replace("present", "past_key_values"): value for name, value in zip(kv_names, outputs, strict=True)
        }
        kv_len += len(ids)
        windows.append(step >= 8)
    trace = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"]
    timed = [(e["ts"], e["ts"] + e["dur"]) for e, keep in zip(runs, windows, strict=True) if keep]
    per_op: dict[str, float] = defaultdict(float)
    bytes_per_op: dict[str, int] = defaultdict(int)
    kernel_total = 0.0
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if not any(start <= event["ts"] <= end for start, end in timed):
            continue
        node = event["name"][: -len("_kernel_time")]
        op = event.get("args", {}).get("op_name") or op_of.get(node, "?")
        if args.by_node:
            op = f"{op} {re.sub(r'[0-9]+', 'N', node)}"
        per_op[op] += event["dur"]
        kernel_total += event["dur"]
        bytes_per_op[op] += weights.get(node, 0)
    steps = len(timed)
    run_us = statistics.fmean(end - start for start, end in timed)
    kv_bytes = sum(v.nbytes for v in past.values()) * (kv_len - args.steps / 2) / kv_len  # mean depth
    attention = [op for op in per_op if op.startswith("GroupQueryAttention")]
    for op in attention:
        bytes_per_op[op] += int(kv_bytes) * steps // len(attention)
    if args.bandwidth:
        bandwidth = args.bandwidth * 1e9
    else:
        from gptcli.bench.roofline import bandwidth as machine_bandwidth

        bandwidth = machine_bandwidth("cpu", notify=lambda m: print(m, file=sys.stderr))["bytes_per_s"]
    print(f"{args.model}  threads={args.threads}  {steps} decode steps after a {args.prompt}-token prompt")
    print(f"step {run_us / 1000:.2f} ms ({1e6 / run_us:.1f} tok/s); read bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print("| op | nodes | ms a step | share | MB a step | GB/s | of bandwidth |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    counts: dict[str, int] = defaultdict(int)
    for node, op in op_of.items():
        counts[f"{op} {re.sub(r'[0-9]+', 'N', node)}" if args.by_node else op] += 1
    rows = sorted(per_op.items(), key=lambda item: -item[1])
    rows.append(("other (outside kernels)", run_us * steps - kernel_total))
    for op, total_us in rows:
        ms = total_us / steps / 1000
        mb = bytes_per_op.get(op, 0) / steps / 1e6
        rate = mb / ms if ms and mb else 0.0
        share = f"{100 * rate * 1e9 / bandwidth:.0f} %" if rate else ""
        rate_text = f"{rate:.1f}" if rate else ""
        mb_text = f"{mb:.1f}" if mb else ""
        print(
            f"| {op} | {counts.get(op, '')} | {ms:.3f} | {100 * total_us / (run_us * steps):.0f} % "
            f"| {mb_text} | {rate_text} | {share} |"
        )


if __name__ == "__main__":
    main()
