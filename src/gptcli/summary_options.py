"""What a summary is asked for (`gptcli summarize`'s --length, --format, --strategy, --chunk-tokens,
--overlap), checked before anything loads; summarize.py does the work."""

from __future__ import annotations

from dataclasses import dataclass

from gptcli.errors import UsageError

LENGTHS = {
    "short": ("in one or two sentences", 96),
    "medium": ("in one short paragraph", 256),
    "long": ("in a few detailed paragraphs", 512),
}
FORMATS = {"paragraph": "as plain prose", "bullets": "as a bulleted list of the key points"}
STRATEGIES = ("auto", "stuff", "map-reduce")

DEFAULT_OVERLAP = 100  # tokens a chunk repeats from the one before when --overlap is not given


@dataclass(frozen=True)
class SummaryOptions:
    length: str = "medium"
    format: str = "paragraph"
    strategy: str = "auto"
    chunk_tokens: int | None = None  # None: as large as the context allows
    overlap: int | None = None  # None: DEFAULT_OVERLAP, or a quarter of a smaller chunk

    def check(self) -> None:
        if self.length not in LENGTHS:
            raise UsageError(f"--length must be one of {', '.join(LENGTHS)}, got {self.length!r}")
        if self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.strategy not in STRATEGIES:
            raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.chunk_tokens is not None and self.chunk_tokens < 16:
            raise UsageError(f"--chunk-tokens must be at least 16, got {self.chunk_tokens}")
        if self.overlap is not None and self.overlap < 0:
            raise UsageError(f"--overlap must be >= 0, got {self.overlap}")
        if self.overlap and self.chunk_tokens is not None and 2 * self.overlap >= self.chunk_tokens:
            raise UsageError(
                f"--overlap {self.overlap} must be under half of --chunk-tokens {self.chunk_tokens}",
                hint=f"pass --overlap {(self.chunk_tokens - 1) // 2} or less, or a larger --chunk-tokens",
            )

    def overlap_for(self, chunk: int) -> int:
        """The tokens each chunk repeats from the one before: --overlap as given, else DEFAULT_OVERLAP, or a
        quarter of the chunk where that is less (the default fails no chunk size that --chunk-tokens takes)."""
        return self.overlap if self.overlap is not None else min(DEFAULT_OVERLAP, chunk // 4)
