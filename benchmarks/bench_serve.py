"""Serving benchmark for any OpenAI-compatible server, in vLLM `bench serve` vocabulary.

    gptcli serve --parallel 16 &                                    # or llama-server, python -m llama_cpp.server
    .venv/bin/python benchmarks/bench_serve.py --base-url http://127.0.0.1:8080 \\
        --max-concurrency 1,4,8,16 --random-input-len 128,512 --random-output-len 128

For each input length and each concurrency, `--num-prompts` random prompts are sent to /v1/completions
(streamed, `stream_options.include_usage`), at most `--max-concurrency` at a time, and we report:
request throughput (req/s), output token throughput (tok/s), and TTFT, TPOT, ITL and E2E latency
(mean, median, p99, in ms), defined as vLLM defines them:
  TTFT  request sent → first streamed text;          E2E   request sent → last byte
  TPOT  (E2E − TTFT) / (output tokens − 1), per request
  ITL   the gaps between consecutive streamed chunks, over all requests
Prompts are random common words; with `--tokenizer FOLDER` (the served model's folder) they are cut to
the exact token count. `--random-prefix-len N` (vLLM's option) starts every prompt of a level with the
same N-token prefix, as a shared system prompt or document does: a server with a prefix cache reads it
once. Output lengths come from the server's `usage` (else: streamed chunks). Servers
that honour `ignore_eos` (vLLM, llama.cpp, gptcli serve) always produce `--random-output-len` tokens;
check the mean output length column for one that does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

COMMON_WORDS = (
    "the of and to in is was for on that with as by at from his her they this which be or are an not "
    "time people year way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name"
)
WORDS = COMMON_WORDS.split()


@dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


def level_seed(seed: int, input_len: int, concurrency: int) -> int:
    """Each level its own prompts: a server with a prompt cache (llama-server's cache_prompt is on by
    default) would otherwise re-serve the previous level's prompts from its slots, skipping their prefill."""
    return seed * 1_000_000 + input_len * 1_000 + concurrency


def make_prompts(count: int, length: int, seed: int, tokenizer_folder: str | None, prefix_len: int = 0) -> list[str]:
    """`count` prompts of `length` random words (tokens, with a tokenizer), each after the same
    `prefix_len`-long prefix."""
    rng = random.Random(seed)
    tokenizer = None
    if tokenizer_folder:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from gptcli.tokenizer import Tokenizer

        tokenizer = Tokenizer(Path(tokenizer_folder))

    def random_text(size: int) -> str:
        words = [rng.choice(WORDS) for _ in range(size)]
        if tokenizer is None:
            return " ".join(words)
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
        while len(ids) < size:  # cut to exactly `size` tokens
            words.append(rng.choice(WORDS))
            ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
        return tokenizer.decode(ids[:size])

    prefix = random_text(prefix_len) + " " if prefix_len else ""
    return [prefix + random_text(length) for _ in range(count)]


async def one_request(client, url: str, body: dict, headers: dict) -> Result:
    start = time.perf_counter()
    last = None
    result = Result(ok=False)
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Result(ok=False, error=f"{response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.output_tokens = usage.get("completion_tokens", 0)
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    chunks += 1
    except Exception as exc:  # a benchmark reports failures, it does not stop at the first
        return Result(ok=False, error=f"{type(exc).__name__}: {exc}")
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = chunks > 0
    return result


async def run_level(
    args, prompts: list[str], warmup: list[str], concurrency: int, model: str
) -> tuple[list[Result], float]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.base_url.rstrip("/") + args.endpoint
    limit = asyncio.Semaphore(concurrency)
    timeout = httpx.Timeout(args.timeout, connect=10)
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)

    def body(prompt: str) -> dict:
        payload = {
            "model": model,
            "prompt": prompt,
            "max_tokens": args.random_output_len,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if args.ignore_eos:
            payload["ignore_eos"] = True
        payload.update(args.extra_body or {})
        return payload

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        for prompt in warmup:
            await one_request(client, url, body(prompt), headers)

        async def limited(prompt: str) -> Result:
            async with limit:
                return await one_request(client, url, body(prompt), headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        return list(results), time.perf_counter() - start


def summarize(results: list[Result], duration: float) -> dict:
    done = [r for r in results if r.ok]
    out: dict = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": round(duration, 3),
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": sum(r.output_tokens for r in done) / duration if duration else 0.0,
        "mean_input_tokens": statistics.fmean(r.prompt_tokens for r in done) if done else 0.0,
        "mean_output_tokens": statistics.fmean(r.output_tokens for r in done) if done else 0.0,
    }
    series = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2e": [r.e2e_s for r in done],
    }
    for name, values in series.items():
        values = sorted(values)
        out[f"mean_{name}_ms"] = statistics.fmean(values) * 1000 if values else 0.0
        out[f"median_{name}_ms"] = statistics.median(values) * 1000 if values else 0.0
        out[f"p99_{name}_ms"] = values[min(len(values) - 1, int(0.99 * len(values)))] * 1000 if values else 0.0
    errors = sorted({r.error for r in results if not r.ok and r.error})
    if errors:
        out["errors"] = errors[:5]
    return out


def table(rows: list[dict]) -> str:
    columns = [
        ("in", "input_len", "{}"),
        ("conc", "concurrency", "{}"),
        ("ok/fail", None, ""),
        ("req/s", "request_throughput", "{:.2f}"),
        ("out tok/s", "output_throughput", "{:.1f}"),
        ("out len", "mean_output_tokens", "{:.0f}"),
    ]
    for metric in ("ttft", "tpot", "itl", "e2e"):
        columns += [(f"{metric.upper()} mean/med/p99 ms", metric, "")]
    lines = []
    header = [name for name, _, _ in columns]
    body = []
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            if key is None:
                cells.append(f"{row['completed']}/{row['failed']}")
            elif key in {"ttft", "tpot", "itl", "e2e"}:
                cells.append(f"{row[f'mean_{key}_ms']:.1f}/{row[f'median_{key}_ms']:.1f}/{row[f'p99_{key}_ms']:.1f}")
            else:
                cells.append(fmt.format(row[key]))
        body.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(header)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) for cells in body)
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def served_model(args) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    response = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8080", help="the server, without /v1")
    parser.add_argument("--endpoint", default="/v1/completions")
    parser.add_argument("--model", help="model id to send (default: the server's first)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--max-concurrency", type=ints, default=[1, 4, 8, 16], help="comma-separated levels")
    parser.add_argument("--random-input-len", type=ints, default=[128, 512], help="comma-separated prompt lengths")
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, help="requests per level (default: 4 × concurrency, at least 8)")
    parser.add_argument("--ignore-eos", action="store_true", help="ask for exactly --random-output-len tokens")
    parser.add_argument("--tokenizer", help="a model folder: prompts of exactly --random-input-len tokens")
    parser.add_argument(
        "--random-prefix-len", type=int, default=0, help="a prefix of this many tokens shared by a level's prompts"
    )
    parser.add_argument(
        "--extra-body",
        type=json.loads,
        help='JSON merged into every request, e.g. \'{"logit_bias": {"2": -100}}\' for a server without ignore_eos',
    )
    parser.add_argument("--warmup", type=int, default=1, help="requests before each measured level")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_out", help="also write every row to this JSON file")
    args = parser.parse_args(argv)

    model = args.model or served_model(args)
    rows = []
    for input_len in args.random_input_len:
        for concurrency in args.max_concurrency:
            count = args.num_prompts or max(8, 4 * concurrency)
            prompts = make_prompts(
                count + args.warmup,
                input_len,
                level_seed(args.seed, input_len, concurrency),
                args.tokenizer,
                args.random_prefix_len,
            )
            measured, warmup = prompts[args.warmup :], prompts[: args.warmup]
            results, duration = asyncio.run(run_level(args, measured, warmup, concurrency, model))
            row = {
                "input_len": input_len,
                "concurrency": concurrency,
                "num_prompts": count,
                **summarize(results, duration),
            }
            rows.append(row)
            print(f"done: input {input_len}, concurrency {concurrency}", file=sys.stderr)
    prefix = f", a shared {args.random_prefix_len}-token prefix" if args.random_prefix_len else ""
    print(
        f"model {model} at {args.base_url}, output {args.random_output_len} tokens{prefix}, "
        f"ignore_eos={args.ignore_eos}"
    )
    print(table(rows))
    for row in rows:
        for error in row.get("errors", []):
            print(f"error (input {row['input_len']}, concurrency {row['concurrency']}): {error}", file=sys.stderr)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "model": model, "rows": rows}, indent=2))
    return 0 if all(row["failed"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
