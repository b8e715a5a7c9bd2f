"""What to benchmark: list flags (`-p 128,512`), llama-bench test names (and llama-batched-bench's
parallel sequences, `--npl`), and the configuration matrix."""

from __future__ import annotations

from dataclasses import dataclass

from gptcli.errors import UsageError, clipped

# Each parallel sequence costs a cache and a row of every batched step; llama-batched-bench runs go to a
# few dozen. The KV caches themselves are checked against the free memory before each test (runner).
MAX_NPL = 256
MAX_REPETITIONS = 1000  # timed repetitions of each test (llama-bench's default is 5)
MAX_TESTS = 4096  # tests in one run: sizes x depths x --npl values

# The options only some modes read: given to another mode they would be ignored without a word (latency
# sends one request at a time whatever --npl says; train always times torch in fp32).
MODE_OPTIONS = {
    "--n-prompt": ("micro",),
    "--n-gen": ("micro",),
    "--pg": ("micro",),
    "--depth": ("micro",),
    "--npl": ("micro",),
    "--prompts": ("latency",),
    "--max-tokens": ("latency",),
    "--temperature": ("latency",),
    "--seed": ("latency",),
    "--preset": ("train",),
    "--train-config": ("train",),
    "--peak-tflops": ("train",),
    "--backend": ("micro", "latency"),
    "--precision": ("micro", "latency"),
}


def check_mode_options(mode: str, given: list[str]) -> None:
    """A usage error for an option (as typed: `-p/--n-prompt`) that `mode` does not read."""
    for flag in given:
        modes = MODE_OPTIONS.get(flag.split("/")[-1], (mode,))
        if mode not in modes:
            also = " or ".join(f"--mode {m}" for m in modes)
            raise UsageError(f"{flag} is for {also}, not --mode {mode}", hint=f"drop {flag}, or run {also}")


def check_repetitions(reps: int) -> None:
    """-r/--repetitions: 1 to MAX_REPETITIONS, else a usage error."""
    if reps < 1:
        raise UsageError(f"-r/--repetitions must be at least 1, got {reps}", hint="e.g. -r 5")
    if reps > MAX_REPETITIONS:
        raise UsageError(f"-r/--repetitions must be at most {MAX_REPETITIONS}, got {reps}", hint="e.g. -r 5")


def split_list(text: str, flag: str) -> list[str]:
    """`a,b,c` → items; an empty item (`1,,2`, `1,`) is a usage error."""
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise UsageError(f"{flag}: bad list '{text}' (empty item)", hint=f"write a comma-separated list: {flag} 1,2")
    return items


def int_list(
    text: str, flag: str, *, minimum: int = 0, maximum: int | None = None, example: str = "128,512"
) -> list[int]:
    values = []
    for item in split_list(text, flag):
        value = whole_number(item, text, flag, example)
        if value < minimum:
            raise UsageError(f"{flag}: {value} is below {minimum}", hint=f"e.g. {flag} {example}")
        if maximum is not None and value > maximum:
            raise UsageError(f"{flag}: {value} is above {maximum}", hint=f"e.g. {flag} {example}")
        values.append(value)
    return list(dict.fromkeys(values))


def name_list(text: str, flag: str) -> list[str]:
    return list(dict.fromkeys(split_list(text, flag)))


def pair(text: str, flag: str) -> tuple[int, int]:
    """`512,128` → (512, 128) for --pg."""
    values = int_list_raw(text, flag)
    if len(values) != 2 or values[0] < 1 or values[1] < 1:
        raise UsageError(
            f"{flag}: expected two positive numbers 'PROMPT,GEN', got '{text}'", hint=f"e.g. {flag} 512,128"
        )
    return values[0], values[1]


def int_list_raw(text: str, flag: str) -> list[int]:
    """Like int_list but keeps duplicates and order (for pairs)."""
    return [whole_number(item, text, flag, "512,128") for item in split_list(text, flag)]


def whole_number(item: str, text: str, flag: str, example: str) -> int:
    """One item of a flag's comma-separated list; the list is named only when it holds more than the item."""
    try:
        return int(item)
    except ValueError:
        where = "" if item == text.strip() else f" in '{clipped(text)}'"
        raise UsageError(
            f"{flag}: '{clipped(item)}'{where} is not a whole number", hint=f"e.g. {flag} {example}"
        ) from None


def npl_list(text: str | None) -> list[int | None]:
    """--npl: the parallel-sequence counts (1 to MAX_NPL); [None] without the flag (one sequence, `forward`)."""
    if text is None:
        return [None]
    return list(int_list(text, "--npl", minimum=1, maximum=MAX_NPL, example="1,2,4,8"))


@dataclass(frozen=True)
class MicroTest:
    """One llama-bench test: prefill n_prompt tokens and/or generate n_gen, after depth cached tokens.

    With `npl` (llama-batched-bench) it runs npl sequences, each with its own cache, every call one
    `batched_step` over all of them; None is the single-sequence test on `forward`.
    """

    n_prompt: int
    n_gen: int
    depth: int = 0
    npl: int | None = None

    @property
    def name(self) -> str:
        parts = []
        if self.n_prompt:
            parts.append(f"pp{self.n_prompt}")
        if self.n_gen:
            parts.append(f"tg{self.n_gen}")
        base = "+".join(parts)
        if self.npl is not None:
            base += f" npl{self.npl}"
        return f"{base} @ d{self.depth}" if self.depth else base

    @property
    def sequences(self) -> int:
        return self.npl or 1

    @property
    def tokens(self) -> int:
        """Tokens counted for t/s: prompt plus generated (llama-bench's convention for ppN+tgM), over
        every parallel sequence (llama-batched-bench's aggregate)."""
        return (self.n_prompt + self.n_gen) * self.sequences

    @property
    def is_decode_only(self) -> bool:
        return self.n_prompt == 0 and self.n_gen > 0

    def context_needed(self) -> int:
        # A pure tg test runs after a 1-token prompt.
        return self.depth + max(self.n_prompt, 1 if self.n_gen else 0) + self.n_gen

    def as_dict(self) -> dict[str, int]:
        data = {"n_prompt": self.n_prompt, "n_gen": self.n_gen, "depth": self.depth}
        return data if self.npl is None else {**data, "npl": self.npl}


def micro_tests(
    prompts: list[int],
    gens: list[int],
    pairs: list[tuple[int, int]],
    depths: list[int],
    npls: list[int | None] | None = None,
) -> list[MicroTest]:
    """llama-bench's order: for each depth, the pp tests, then tg, then pp+tg pairs; each at every npl.

    More than MAX_TESTS tests is a usage error, raised before any is built."""
    sizes = [(n, 0) for n in prompts if n > 0] + [(0, n) for n in gens if n > 0] + list(dict.fromkeys(pairs))
    count = len(set(depths)) * len(sizes) * len(set(npls or [None]))
    if count > MAX_TESTS:
        raise UsageError(
            f"{count} tests (test sizes x depths x --npl values) is over the limit of {MAX_TESTS}",
            hint="run fewer -p/-n/--pg sizes, --depth or --npl values at once",
        )
    tests: list[MicroTest] = []
    for depth in depths:
        tests += [MicroTest(p, g, depth, npl) for p, g in sizes for npl in npls or [None]]
    if not tests:
        raise UsageError("nothing to benchmark: every test size is 0", hint="e.g. -p 512 -n 128")
    return list(dict.fromkeys(tests))
