"""A reply's timings as one line of text (the `--stats` line of generate and the `/stats` of chat), and its usage.

Plain text (no Rich): the CLI renders it; chat's slash commands return it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the CLI imports this module; decoding brings numpy)
    from gptcli.decoding import Stats


def usage(stats: Stats) -> dict[str, int | None]:
    """OpenAI-style usage for --json (null counts where the prompt's is not known)."""
    total = None if stats.prompt_tokens is None else stats.prompt_tokens + stats.new_tokens
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens, "total_tokens": total}


def timings_line(stats: Stats, *, cached: str = "") -> str:
    """`prompt … tok · TTFT … ms · prefill … tok/s · … new tok · decode … tok/s · total … s`.

    `cached` says where the prompt's cached tokens came from, after their count (chat: "reused from the last turn").
    """
    prompt = f"prompt {'?' if stats.prompt_tokens is None else stats.prompt_tokens} tok"
    if cached:
        prompt += f" ({stats.cached_tokens} {cached})"
    ttft = f"{first * 1000:.0f} ms" if (first := stats.first_token_s) is not None else "none (no token)"
    return (
        f"{prompt} · TTFT {ttft} · prefill {stats.prefill_tokens_per_s:.1f} tok/s"
        f" · {stats.new_tokens} new tok · decode {stats.decode_tokens_per_s:.1f} tok/s · total {stats.total_s:.2f} s"
    )
