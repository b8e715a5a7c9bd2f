"""Render benchmark records: table | md | csv | json | jsonl. Every format parses back
(`parse_output`), so a saved run is data, not just a picture."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

from gptcli.bench.stats import mean_sd_text
from gptcli.textio import human_bytes

FORMATS = ("table", "md", "csv", "json", "jsonl")
SCHEMA = 1


def _bytes_cell(n: float | None) -> str:
    return "" if n is None else human_bytes(n, digits=2)


def human_count(n: int | None) -> str:
    if n is None:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _memory(record: dict[str, Any]) -> str:
    rss = record.get("peak_rss_mib")
    text = "" if rss is None else f"{rss:.0f} MiB"
    if record.get("gpu_peak_mib") is not None:
        text += f" + GPU {record['gpu_peak_mib']:.0f} MiB"
    return text


def config_label(record: dict[str, Any]) -> str:
    """A result's configuration as the backend column shows it (and bench's progress): 'torch cpu bf16'."""
    return f"{record['backend']} {record['device']} {record['precision']}"


def _base(record: dict[str, Any]) -> str:
    base = record.get("baseline")
    return "n/a" if base is None else _ratio(base.get("ratio"))


def _per_seq(record: dict[str, Any]) -> str:
    if record.get("tokens_per_s_per_seq") is None:
        return ""
    return mean_sd_text(record["tokens_per_s_per_seq"], record["tokens_per_s_per_seq_sd"], record.get("reps", 2))


def micro_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    speedup = any(r.get("speedup") is not None for r in records)
    baseline = any("baseline" in r for r in records)
    per_seq = any(r.get("tokens_per_s_per_seq") is not None for r in records)  # --npl (llama-batched-bench)
    headers = ["model", "size", "params", "backend", "threads", "test", "t/s"] + ["t/s/seq"] * per_seq
    headers += ["speedup"] * speedup + ["vs baseline"] * baseline + ["% of bw floor", "peak mem"]
    rows = []
    for r in records:
        row = [
            r["model"],
            _bytes_cell(r.get("size_bytes")),
            human_count(r.get("params")),
            config_label(r),
            str(r["threads"]),
            r["test"],
            mean_sd_text(r["tokens_per_s"], r["tokens_per_s_sd"], r.get("reps", 2)),
        ]
        row += [_per_seq(r)] * per_seq + [_ratio(r.get("speedup"))] * speedup + [_base(r)] * baseline
        floor = ""
        if r.get("roofline_pct") is not None:
            floor = f"{r['roofline_pct']:.1f}% of {r['roofline_tokens_per_s']:.1f} t/s"
        rows.append([*row, floor, _memory(r)])
    return headers, rows


LATENCY_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def latency_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    speedup = any(r.get("speedup") is not None for r in records)
    baseline = any("baseline" in r for r in records)
    headers = ["model", "backend", "threads", "requests", "metric", "mean ms", "median ms", "p90 ms", "p99 ms"]
    headers += ["speedup"] * speedup + ["vs baseline"] * baseline + ["peak mem"]
    rows = []
    for r in records:
        for key, label in LATENCY_METRICS:
            dist = r.get(key)
            cells = [f"{dist[k]:.2f}" for k in ("mean", "median", "p90", "p99")] if dist else ["", "", "", ""]
            row = [r["model"], config_label(r), str(r["threads"]), str(r["requests"]), label, *cells]
            is_e2e = key == "e2e_ms"
            row += [_ratio(r.get("speedup")) if is_e2e else ""] * speedup
            row += [_base(r) if is_e2e else ""] * baseline
            rows.append([*row, _memory(r)])
    return headers, rows


def train_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    baseline = any("baseline" in r for r in records)
    headers = ["model", "params", "backend", "threads", "test", "ms/iter", "tokens/s", "MFU", "peak TFLOPS"]
    headers += ["vs baseline"] * baseline + ["peak mem"]
    rows = []
    for r in records:
        mfu = "" if r.get("mfu_pct") is None else f"{r['mfu_pct']:.2f}%"
        peak = "" if r.get("peak_tflops") is None else f"{r['peak_tflops']:g} ({r.get('peak_source', '')})"
        row = [
            r["model"],
            human_count(r.get("params")),
            config_label(r),
            str(r["threads"]),
            r["test"],
            mean_sd_text(r["ms_per_iter"], r["ms_per_iter_sd"], r.get("reps", 2), digits=1),
            f"{r['tokens_per_s']:.1f}",
            mfu,
            peak,
        ]
        rows.append([*row, *([_base(r)] * baseline), _memory(r)])
    return headers, rows


TABLES: dict[str, Callable[[list[dict[str, Any]]], tuple[list[str], list[list[str]]]]] = {
    "micro": micro_table,
    "latency": latency_table,
    "train": train_table,
}


def table_of(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    mode = records[0]["mode"] if records else "micro"
    return TABLES[mode](records)


def render_text(headers: list[str], rows: list[list[str]]) -> str:
    """Aligned columns, two spaces apart, a dashed rule under the header (column positions)."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def render_markdown(headers: list[str], rows: list[list[str]]) -> str:
    def escape(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become `a_b` columns; lists become space-separated cells (for CSV)."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}_"))
        elif isinstance(value, list):
            flat[name] = " ".join(str(v) for v in value)
        else:
            flat[name] = "" if value is None else value
    return flat


def render_csv(records: list[dict[str, Any]]) -> str:
    flat = [flatten(r) for r in records]
    columns = list(dict.fromkeys(k for row in flat for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return out.getvalue().rstrip("\n")


def document(
    records: list[dict[str, Any]], environment: dict[str, Any], notes: list[str], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"gptcli_bench": SCHEMA, "environment": environment, "notes": notes, **(extra or {}), "results": records}


def jsonl_lines(records: list[dict[str, Any]], environment: dict[str, Any]) -> list[str]:
    return [json.dumps({**r, "environment": environment}, ensure_ascii=False) for r in records]


def render(
    fmt: str,
    records: list[dict[str, Any]],
    *,
    environment: dict[str, Any],
    notes: list[str],
    extra: dict[str, Any] | None = None,
) -> str:
    """The product on stdout. Table and md carry the notes under the table."""
    if fmt == "json":
        return json.dumps(document(records, environment, notes, extra), indent=2, ensure_ascii=False)
    if fmt == "jsonl":
        return "\n".join(jsonl_lines(records, environment))
    if fmt == "csv":
        return render_csv(records)
    headers, rows = table_of(records)
    body = render_text(headers, rows) if fmt == "table" else render_markdown(headers, rows)
    return body + ("\n\n" + "\n".join(f"note: {n}" for n in notes) if notes else "")


# --- parsing back ---------------------------------------------------------------------------------------


def parse_text_table(text: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    header, rule = lines[0], lines[1]
    spans, start = [], 0
    for run in rule.split("  "):
        spans.append((start, start + len(run)))
        start += len(run) + 2
    names = [header[a:b].strip() for a, b in spans]
    rows = []
    for line in lines[2:]:
        if not line.strip():
            break
        rows.append({n: line[a:b].strip() for n, (a, b) in zip(names, spans, strict=True)})
    return rows


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    import re

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        return [p.strip().replace("\\|", "|") for p in parts]

    lines = [line for line in text.splitlines() if line.startswith("|")]
    names = cells(lines[0])
    return [dict(zip(names, cells(line), strict=True)) for line in lines[2:]]


def parse_output(fmt: str, text: str) -> list[dict[str, Any]]:
    """Rows of any format we print (tables give strings, json/jsonl give the records)."""
    if fmt == "json":
        return json.loads(text)["results"]
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    if fmt == "md":
        return parse_markdown_table(text)
    return parse_text_table(text)
