"""Summaries: one pass when the text fits, map-reduce on the model's own token counts when it does not."""

import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from gptcli.backends.base import ModelInfo
from tests.conftest import run_cli

SCRIPTED = {"GPTCLI_BACKEND_PATHS": "scripted=tests.scripted:ScriptedBackend", "GPTCLI_TEST_CONTEXT": "4096"}


@pytest.fixture(scope="module")
def tok(tiny_models):
    from gptcli.tokenizer import Tokenizer

    return Tokenizer(tiny_models["llama"])


@dataclass
class TextCache:
    ids: list = field(default_factory=list)
    pending: list = field(default_factory=list)  # the rest of this sequence's scripted reply

    @property
    def length(self):
        return len(self.ids)


class ReadingBackend:
    """Reads each prompt it is given and answers like a summariser would: 'Part N.' per chunk,
    'Merged N.' per combine call (or 'Final.' when it combines everything that is left)."""

    name = "reading"

    def __init__(self, tok, context, part_words=1):
        self.tok = tok
        self.info = ModelInfo("reading", "Reading", context, tok.vocab_size, 0, 0, "float32", "cpu")
        self.prompts: list[tuple[str, str, int]] = []  # (kind, full prompt text, prompt tokens)
        self.part_words = part_words
        self.expected_partials = None

    def new_cache(self):
        return TextCache()

    def truncate(self, cache, length):
        cache.ids = cache.ids[:length]
        return cache

    def forward(self, ids, cache):
        cache.ids = cache.ids + list(ids)
        if len(ids) > 1:  # a prefill: decide the whole reply from the prompt
            text = self.tok.decode(cache.ids, skip_special_tokens=False)
            if "Combine them" in text:
                parts = text.count("Part ") + text.count("Merged ")
                kind = "combine"
                n = sum(1 for k, _, _ in self.prompts if k == "combine") + 1
                answer = "Final." if parts == self.expected_partials else f"Merged {n} " + "text " * self.part_words
            else:
                kind = "map"
                n = sum(1 for k, _, _ in self.prompts if k == "map") + 1
                answer = f"Part {n} " + "word " * self.part_words
            self.prompts.append((kind, text, len(cache.ids)))
            cache.pending = [*self.tok.encode(answer.strip(), add_special_tokens=False), min(self.tok.eos_ids)]
        logits = np.zeros(self.tok.vocab_size, dtype=np.float32)
        logits[cache.pending.pop(0) if cache.pending else min(self.tok.eos_ids)] = 50.0
        return logits, cache


def document(paragraphs=30):
    sentences = [
        "The river rose slowly through the night and the town watched it climb.",
        "By morning the bridge was closed and the market moved to the hill.",
        "Children carried sandbags while the baker handed out bread for free.",
    ]
    return "\n\n".join(f"Chapter {i}. " + " ".join(sentences) for i in range(paragraphs))


def summarizer(backend, tok, max_tokens=16):
    from gptcli.config import SamplingConfig
    from gptcli.summarize import Summarizer
    from gptcli.templates import get_template

    return Summarizer(backend, tok, get_template("summarize"), SamplingConfig(temperature=0, max_tokens=max_tokens))


def test_short_text_goes_in_one_pass(tok):
    from gptcli.summarize import SummaryOptions

    backend = ReadingBackend(tok, 4096)
    result = summarizer(backend, tok).run(document(2), SummaryOptions())
    assert result.strategy == "stuff" and result.chunks == [] and result.summary == "Part 1 word"
    assert [k for k, _, _ in backend.prompts] == ["map"]  # one call (the stuff prompt reads like a map prompt)


def test_long_text_map_reduce_chunks_within_budget(tok):
    from gptcli.summarize import SummaryOptions

    text = document(30)
    backend = ReadingBackend(tok, 512)
    s = summarizer(backend, tok)
    total = s.count(text)
    budget = s.input_budget()
    assert total > 512  # longer than the whole context
    expected_chunks = len(s.chunk(text, budget, 0))
    backend.expected_partials = expected_chunks
    result = s.run(text, SummaryOptions(overlap=0))
    assert result.strategy == "map-reduce"
    assert len(result.chunks) == expected_chunks >= 2
    assert all(n <= budget for n in result.chunks)
    maps = [p for p in backend.prompts if p[0] == "map"]
    assert len(maps) == expected_chunks
    assert all(tokens + s.sampling.max_tokens <= 512 for _, _, tokens in backend.prompts)  # every call fits
    # Every chunk starts on a paragraph boundary, and together they hold the whole text.
    assert all(p[1].count("Chapter ") >= 1 for p in maps)
    assert sum(s.count(c) for c in s.chunk(text, budget, 0)) >= total - 2 * expected_chunks
    assert result.summary == "Final."  # the combine step's answer, not a chunk's
    assert backend.prompts[-1][0] == "combine" and result.combine_levels == 1


def test_combine_recurses_when_partials_do_not_fit_together(tok):
    from gptcli.summarize import SummaryOptions

    text = document(40)
    backend = ReadingBackend(tok, 400, part_words=40)  # long partial summaries
    s = summarizer(backend, tok, max_tokens=60)
    result = s.run(text, SummaryOptions(overlap=0, chunk_tokens=120))
    assert len(result.chunks) >= 6 and all(n <= 120 for n in result.chunks)
    assert result.combine_levels >= 2
    combines = [c for c in result.calls if c.stage == "combine"]
    assert combines[-1].level == result.combine_levels
    assert all(c.prompt_tokens + s.sampling.max_tokens <= 400 for c in result.calls)
    assert result.summary.startswith("Merged")  # the last combine's output
    data = result.as_dict()
    assert data["chunks"] == len(result.chunks) and data["combine_levels"] == result.combine_levels


def test_overlap_repeats_the_previous_tail(tok):
    s = summarizer(ReadingBackend(tok, 4096), tok)
    text = document(10)
    chunks = s.chunk(text, 200, 40)
    assert len(chunks) >= 2 and all(s.count(c) <= 200 for c in chunks)
    tail = tok.decode(tok.encode(chunks[0], add_special_tokens=False)[-40:]).strip()
    assert chunks[1].startswith(tail)  # the second chunk starts with the first one's last 40 tokens


def test_unsplittable_sentence_is_cut_on_tokens(tok):
    from gptcli.textio import split_text

    s = summarizer(ReadingBackend(tok, 4096), tok)
    blob = "x" * 3000  # no paragraph or sentence boundary at all
    chunks = split_text(blob, 50, s.count, s.cut)
    assert len(chunks) > 1 and all(s.count(c) <= 50 for c in chunks)
    assert "".join(chunks) == blob


def test_split_text_counts_each_piece_about_once_and_keeps_every_chunk_in_budget(tok):
    """Packing re-counted the growing chunk at every paragraph: a 1 MB text took a minute to split."""
    from gptcli.textio import split_text

    s = summarizer(ReadingBackend(tok, 4096), tok)
    counted = []

    def count(text: str) -> int:
        counted.append(len(text))
        return s.count(text)

    text = "\n\n".join(f"Paragraph {i} says a few words, then stops." for i in range(2000))
    chunks = split_text(text, 1000, count, s.cut)
    assert len(chunks) > 1 and all(s.count(c) <= 1000 for c in chunks)
    assert "\n\n".join(chunks) == text
    assert sum(counted) < 3 * len(text), sum(counted) / len(text)  # each piece, then each chunk: ~2x the text

    def merging(text: str) -> int:  # joints that cost more than the pieces and a sample joint say: still in budget
        return s.count(text) + 5 * text.count("\n\nP")

    chunks = split_text(text, 200, merging, s.cut)
    assert all(merging(c) <= 200 for c in chunks) and "\n\n".join(chunks) == text


def test_stuff_refuses_a_text_that_does_not_fit(tok):
    from gptcli.errors import InputError
    from gptcli.summarize import SummaryOptions

    with pytest.raises(InputError, match="one pass takes at most"):
        summarizer(ReadingBackend(tok, 512), tok).run(document(30), SummaryOptions(strategy="stuff"))


def test_stuff_says_the_most_one_pass_really_takes(tok):
    """It said "at most 216" (the context less a whole --max-tokens reply) of a context where a pass shortens its
    reply and takes 440 tokens of text; and a negative "at most -286" where the instructions fill the context."""
    import re

    from gptcli.errors import InputError
    from gptcli.summarize import SummaryOptions

    stuff = SummaryOptions(strategy="stuff")
    with pytest.raises(InputError) as caught:
        summarizer(ReadingBackend(tok, 512), tok, max_tokens=256).run(document(30), stuff)
    most = int(re.search(r"one pass takes at most (\d+) ", caught.value.message)[1])
    s = summarizer(ReadingBackend(tok, 512), tok, max_tokens=256)
    over = next(c for n in range(most + 1, most + 9) if s.count(c := s.cut(document(30), n)[0]) > most)
    with pytest.raises(InputError, match=rf"the text is {s.count(over)} tokens but one pass takes at most {most} "):
        s.run(over, stuff)
    under = next(c for n in range(most, most - 9, -1) if s.count(c := s.cut(document(30), n)[0]) <= most)
    assert s.run(under, stuff).strategy == "stuff"
    with pytest.raises(InputError, match=r"context \(40 tokens\) is too small for one pass: the instructions alone"):
        summarizer(ReadingBackend(tok, 40), tok).run(document(1), stuff)


def test_cli_summarize_json_and_stdout_only_summary(tiny_models, tok, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(document(2))
    env = {**SCRIPTED, "GPTCLI_TEST_SCRIPT": json.dumps([*tok.encode("A flood.", add_special_tokens=False), 2])}
    args = ["summarize", str(doc), "-m", str(tiny_models["llama"]), "-b", "scripted"]
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "A flood.\n"
    as_json = json.loads(run_cli(*args, "--json", env=env).stdout)
    assert as_json["summary"] == "A flood." and as_json["strategy"] == "stuff"
    assert as_json["input_tokens"] > 0 and as_json["calls"][0]["stage"] == "stuff"
    piped = run_cli("summarize", "-m", str(tiny_models["llama"]), "-b", "scripted", input=document(2), env=env)
    assert piped.stdout.decode() == "A flood.\n"


def test_cli_map_reduce_on_a_small_context(tiny_models, tok, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(document(20))
    # Each call answers with the next scripted words; the last call's answer is the summary.
    words = [*tok.encode("Part.", add_special_tokens=False), 2] * 200
    env = {**SCRIPTED, "GPTCLI_TEST_CONTEXT": "600", "GPTCLI_TEST_SCRIPT": json.dumps(words)}
    args = ["summarize", str(doc), "-m", str(tiny_models["llama"]), "-b", "scripted", "--json", "--overlap", "20"]
    result = run_cli(*args, "--chunk-tokens", "200", env=env)
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert data["strategy"] == "map-reduce" and data["chunks"] >= 3
    assert all(n <= 200 for n in data["chunk_tokens"])
    assert data["calls"][-1]["stage"] == "combine"
    assert "map-reduce:" in result.stderr.decode()


def test_the_default_overlap_fits_a_small_chunk_and_a_given_one_that_cannot_fails_before_the_model_loads(
    tiny_models, tok, tmp_path
):
    """`--chunk-tokens 200` alone failed after the model loaded with "--overlap 100 must be under half of the chunk
    size", naming a flag that was never given: the default now repeats at most a quarter of a chunk."""
    from gptcli.summarize import SummaryOptions

    doc = tmp_path / "doc.txt"
    doc.write_text(document(20))
    words = [*tok.encode("Part.", add_special_tokens=False), 2] * 200
    env = {**SCRIPTED, "GPTCLI_TEST_CONTEXT": "600", "GPTCLI_TEST_SCRIPT": json.dumps(words)}
    args = ["summarize", str(doc), "-m", str(tiny_models["llama"]), "-b", "scripted", "--json", "--chunk-tokens", "120"]
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["chunks"] >= 3
    assert SummaryOptions(chunk_tokens=120).overlap_for(120) == 30 and SummaryOptions().overlap_for(4000) == 100
    refused = run_cli(*args, "--overlap", "60", "-m", str(tmp_path / "no-such-model"), env=env)
    assert refused.returncode == 2, refused.stderr.decode()  # a usage error, found before the (missing) model
    assert refused.stderr.decode().splitlines() == [
        "error: --overlap 60 must be under half of --chunk-tokens 120",
        "hint: pass --overlap 59 or less, or a larger --chunk-tokens",
    ]


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        (b"", 6, "error: nothing to summarise: {path} is empty"),
        (b"   \n\n", 6, "error: nothing to summarise: {path} holds only whitespace"),  # was: "is empty"
        (b"abc\x00def", 6, "looks like a binary file"),
        ("café".encode("latin-1"), 6, "is not valid UTF-8"),
    ],
)
def test_cli_bad_input(tmp_path, content, code, message):
    path = tmp_path / "in.txt"
    path.write_bytes(content)
    result = run_cli("summarize", str(path), "-m", "/nonexistent")
    assert result.returncode == code
    assert message.format(path=path) in result.stderr.decode().splitlines()[0]
    assert result.stdout == b""


def test_cli_missing_file_and_bad_options():
    missing = run_cli("summarize", "missing.txt")
    assert missing.returncode == 6 and missing.stderr.decode().startswith("error: file not found: missing.txt")
    bad = run_cli("summarize", "x.txt", "--length", "huge")
    assert bad.returncode == 2 and "--length must be one of short, medium, long" in bad.stderr.decode()


OWN_SUMMARIZE = "user: 'Sum up {input} {length}, {format}'\nsampling:\n  max_tokens: 40\n"  # a user summarize.yaml


@pytest.mark.parametrize(
    ("args", "env", "template", "instruction", "max_tokens"),
    [
        (["--length", "short"], {}, None, "in one or two sentences", 96),
        ([], {}, None, "in one short paragraph", 256),  # medium is the default
        (["--length", "long"], {}, None, "in a few detailed paragraphs", 512),
        (["--length", "long", "--max-tokens", "20"], {}, None, "in a few detailed paragraphs", 20),  # a flag wins
        (["--length", "short"], {"GPTCLI_MAX_TOKENS": "30"}, None, "in one or two sentences", 30),  # so does the env
        ([], {}, OWN_SUMMARIZE, "in one short paragraph", 40),  # was: 256, --length's default beat the template
        (["--length", "short"], {}, OWN_SUMMARIZE, "in one or two sentences", 96),  # an explicit --length wins
        (["--max-tokens", "20"], {}, OWN_SUMMARIZE, "in one short paragraph", 20),
        ([], {}, OWN_SUMMARIZE.split("sampling")[0], "in one short paragraph", 256),  # the template says nothing
    ],
)
def test_length_sets_the_instruction_and_the_default_max_tokens(
    tiny_models, tok, tmp_path, capsys, monkeypatch, args, env, template, instruction, max_tokens
):
    """In-process, with a model that never stops: each reply runs to its max_tokens."""
    import io
    import sys

    from gptcli.cli.app import run
    from gptcli.templates import user_templates_dir
    from tests.scripted import ScriptedBackend

    if template is not None:
        user_templates_dir().mkdir(parents=True)
        (user_templates_dir() / "summarize.yaml").write_text(template)

    loaded: list[ScriptedBackend] = []
    real_load = ScriptedBackend.load.__func__
    monkeypatch.setattr(
        ScriptedBackend, "load", classmethod(lambda cls, *a: loaded.append(real_load(cls, *a)) or loaded[-1])
    )
    never_stops = tok.encode("word " * 600, add_special_tokens=False)
    # "word word word ..." is a loop to the repetition stop: turn it off, this model must run to max_tokens.
    unstoppable = {"GPTCLI_TEST_SCRIPT": json.dumps(never_stops), "GPTCLI_REPETITION_STOP": "0"}
    for key, value in {**SCRIPTED, **unstoppable, **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    doc = tmp_path / "doc.txt"
    doc.write_text("The river rose.\n\nThe town watched.\n")
    code = run(["summarize", str(doc), "-m", str(tiny_models["llama"]), "-b", "scripted", "--json", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    [call] = json.loads(out)["calls"]
    assert (call["stage"], call["output_tokens"]) == ("stuff", max_tokens)
    [backend] = loaded
    prompt = tok.decode(backend.calls[0], skip_special_tokens=False)
    assert instruction in prompt


PAGE = """\
The first public library in the town of Millbrook opened in 1887, in a single room above the post office.
It held four hundred books, most of them donated by a retired sea captain named Elias Hartley, who had
collected them on his voyages. Hartley insisted that the library be free to everyone, including children,
which was unusual at the time.

For thirty years the library grew slowly. Volunteers ran it, and the collection was catalogued by hand in a
large green ledger that still survives. In 1921 a fire in the post office destroyed nearly half of the books.
The townspeople responded by raising money for a separate building made of brick, which opened in 1924 on
Main Street.

The new building had electric lights, a reading room with large windows, and a children's corner. Attendance
tripled within a year. Today the Millbrook library lends more than fifty thousand books a year, runs reading
programs for children, and keeps Hartley's original ledger in a glass case near the entrance.
"""


@pytest.mark.integration
def test_default_model_summarises_a_page(default_model_home, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCLI_HOME", str(default_model_home))
    page = tmp_path / "page.txt"
    page.write_text(PAGE)
    result = run_cli("summarize", str(page), "--length", "short", "--temperature", "0", "--json", timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert data["strategy"] == "stuff" and data["model"] == "smollm2-135m-instruct"
    summary = data["summary"].lower()
    assert "library" in summary
    assert len(summary) < len(PAGE)


def test_context_too_small_for_the_instructions(tiny_models, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The river rose.\n\nThe town watched.\n")
    result = run_cli("summarize", str(doc), "-m", str(tiny_models["llama"]))  # the real tiny model: 128 tokens
    assert result.returncode == 6
    assert result.stderr.decode().startswith("error: the model's context (128 tokens) is too small to summarise")


def test_parallel_map_runs_chunks_in_one_step_and_gives_the_same_summary(tok):
    from gptcli.summarize import SummaryOptions

    class Stepping(ReadingBackend):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.widths = []

        def step(self, batch):
            self.widths.append(len(batch))
            rows = [self.forward(ids, cache) for ids, cache in batch]
            return np.stack([r[0] for r in rows]), [r[1] for r in rows]

    text = document(30)
    results = {}
    for parallel in (1, 4):
        backend = Stepping(tok, 512)
        s = summarizer(backend, tok)
        s.__init__(backend, tok, s.template, s.sampling, parallel=parallel)
        backend.expected_partials = len(s.chunk(text, s.input_budget(), 0))
        results[parallel] = (s.run(text, SummaryOptions(overlap=0, chunk_tokens=s.input_budget())), backend)
    (one, serial), (four, batched) = results[1], results[4]
    assert four.summary == one.summary == "Final."
    assert four.chunks == one.chunks and len(one.chunks) >= 3
    assert max(serial.widths) == 1 and max(batched.widths) == min(4, len(one.chunks))


def test_parallel_cuts_smaller_chunks_to_fill_the_batch(tok):
    backend = ReadingBackend(tok, 4096)
    s = summarizer(backend, tok)
    s.__init__(backend, tok, s.template, s.sampling, parallel=8)
    total = s.count(document(60))
    chunk = s.parallel_chunk(total, s.input_budget(), 0)
    assert (chunk < s.input_budget() and -(-total // chunk) >= 8) or chunk == 384


def test_a_long_text_is_counted_and_cut_a_piece_at_a_time(tok, monkeypatch):
    from gptcli.textio import PIECE_CHARS

    s = summarizer(ReadingBackend(tok, 4096), tok)
    longest = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: longest.append(len(text)) or real(text, **kw))
    blob = "word " * (PIECE_CHARS // 2)  # 2.5 Mi characters (one 60 MB line took 8.6 GB encoded whole)
    total = s.count(blob)
    chunks = s.cut(blob, 4000)
    assert max(longest) <= PIECE_CHARS and total > 500_000
    assert "".join(chunks) == blob and all(s.count(c) <= 4000 for c in chunks[:3])


def test_an_overlap_fits_the_chunks_parallel_cuts_and_the_kv_budget_caps_them(tok):
    backend = ReadingBackend(tok, 4096)
    s = summarizer(backend, tok)
    s.__init__(backend, tok, s.template, s.sampling, parallel=8)
    chunk = s.parallel_chunk(s.count(document(12)), s.input_budget(), 600)
    assert chunk > 1200  # was 384 + ...: under twice the overlap, so chunk() refused the user's --overlap
    s.chunk(document(12), chunk, 600)
    s.__init__(backend, tok, s.template, s.sampling, kv_budget_tokens=1000)
    assert s.input_budget() <= 1000 - 16  # a chunk's prompt and reply fit the budget (was: the context's 4096)


def test_a_kv_budget_too_small_for_the_instructions_is_named_not_the_context(tok):
    """--kv-budget 40 on a 4096-token model said "the model's context (4096 tokens) is too small ... hint: use a
    model with a longer context"."""
    from gptcli.errors import InputError
    from gptcli.summarize import SummaryOptions

    backend = ReadingBackend(tok, 4096)
    s = summarizer(backend, tok)
    s.__init__(backend, tok, s.template, s.sampling, kv_budget_tokens=40)
    for strategy, what in (("stuff", "for one pass"), ("map-reduce", "to summarise this text")):
        with pytest.raises(
            InputError, match=rf"^the KV budget \(40 tokens, --kv-budget\) is too small {what}: "
        ) as info:
            s.run(document(1), SummaryOptions(strategy=strategy))
        assert info.value.hint == "raise --kv-budget"


def test_ctrl_c_prints_the_finished_chunk_summaries_and_exits_130(tiny_models, tok, tmp_path):
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    doc = tmp_path / "doc.txt"
    doc.write_text(document(20))
    # Short answers for the first chunks, then one that never ends: Ctrl-C lands while it runs.
    answer = [*tok.encode("Part.", add_special_tokens=False), 2]
    script = answer * 3 + [7] * 5000
    env = {
        **__import__("os").environ,
        **SCRIPTED,
        "GPTCLI_TEST_CONTEXT": "600",
        "GPTCLI_TEST_SCRIPT": json.dumps(script),
        "GPTCLI_TEST_DELAY": "0.01",
        "GPTCLI_REPETITION_STOP": "0",  # the endless chunk must not be cut as a loop
    }
    args = ["summarize", str(doc), "-m", str(tiny_models["llama"]), "-b", "scripted", "--parallel", "1"]
    args += ["--chunk-tokens", "200", "--overlap", "0", "--max-tokens", "4000", "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcli", *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    import time

    time.sleep(8)
    proc.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    # The chunks not yet started are not started after Ctrl-C (they once all ran first: 14 s more here).
    assert time.monotonic() - interrupted < 5
    data = json.loads(out)
    assert data["partial"] is True and data["partials"][:1] == ["Part."]
    assert "chunk summaries were finished" in err.decode() and "Traceback" not in err.decode()


def _calls_finishing(order: list[int], interrupted: set[int]):
    """StageCalls whose map calls finish in `order` (the rest: interrupted), answering 'Part N.'."""
    from gptcli.decoding import Finished, Stats

    def calls(requests, sampling):
        stats = Stats(1, 0, 1, 1, 0.0, 0.0, 0.0, 0.0)
        for index in order:
            yield index, Finished("stop", stats, f"Part {index}.", ())
        for index in sorted(interrupted):
            yield index, Finished("interrupted", stats, "", ())

    return calls


def test_ctrl_c_keeps_the_finished_chunk_summaries_in_the_documents_order(tok):
    from gptcli.config import SamplingConfig
    from gptcli.summarize import Summarizer, SummaryInterrupted, SummaryOptions
    from gptcli.templates import get_template

    calls = _calls_finishing([3, 0, 2], {1, 4})
    s = Summarizer(None, tok, get_template("summarize"), SamplingConfig(max_tokens=16), calls=calls, context_length=600)
    with pytest.raises(SummaryInterrupted) as stop:
        s.run(document(20), SummaryOptions(strategy="map-reduce", chunk_tokens=200, overlap=0))
    result = stop.value.result
    assert len(result.chunks) == 20 and result.partials == ["Part 0.", "Part 2.", "Part 3."]  # not 3, 0, 2


def _calls_failing_after(finished: list[int], error):
    """StageCalls that finish the map calls `finished`, then raise `error` (a server that went away)."""
    from gptcli.decoding import Finished, Stats

    def calls(requests, sampling):
        stats = Stats(1, 0, 1, 1, 0.0, 0.0, 0.0, 0.0)
        for index in finished:
            yield index, Finished("stop", stats, f"Part {index}.", ())
        raise error

    return calls


def test_an_error_after_chunk_summaries_finished_keeps_them_and_is_still_the_error(tok):
    """`summarize --url` whose server died mid-run lost the chunk summaries that had come back (Ctrl-C kept them)."""
    from gptcli.config import SamplingConfig
    from gptcli.errors import BackendError
    from gptcli.summarize import Summarizer, SummaryInterrupted, SummaryOptions
    from gptcli.templates import get_template

    def run(finished):
        error = BackendError("the server closed the connection")
        calls = _calls_failing_after(finished, error)
        s = Summarizer(
            None, tok, get_template("summarize"), SamplingConfig(max_tokens=16), calls=calls, context_length=600
        )
        return s.run(document(20), SummaryOptions(strategy="map-reduce", chunk_tokens=200, overlap=0)), error

    with pytest.raises(SummaryInterrupted) as stop:
        run([2, 0])
    assert stop.value.result.partials == ["Part 0.", "Part 2."] and stop.value.result.interrupted
    assert str(stop.value.error) == "the server closed the connection"
    with pytest.raises(BackendError):  # nothing finished: only the error
        run([])


def test_summarize_prints_the_kept_chunk_summaries_then_exits_with_the_error(tok, tmp_path, monkeypatch, capsys):
    from gptcli.cli import summarize_cmd
    from gptcli.cli.app import run
    from gptcli.config import SamplingConfig
    from gptcli.errors import BackendError
    from gptcli.summarize import Summarizer

    def failing_summarizer(remote, settings, template, **options):
        calls = _calls_failing_after([1, 0], BackendError("the server closed the connection"))
        summarizer = Summarizer(None, tok, template, SamplingConfig(max_tokens=16), calls=calls, context_length=600)
        return summarizer, {"model": "m", "url": "http://127.0.0.1:9/v1"}

    monkeypatch.setattr(summarize_cmd, "_summarizer", failing_summarizer)
    doc = tmp_path / "doc.txt"
    doc.write_text(document(20))
    args = ["summarize", str(doc), "--url", "http://127.0.0.1:9/v1", "-m", "m", "--strategy", "map-reduce"]
    code = run([*args, "--chunk-tokens", "200", "--overlap", "0"])
    out, err = capsys.readouterr()
    assert code == BackendError.exit_code, err
    assert out == "Part 0.\n\nPart 1.\n"
    assert "stopped by an error: 2 of 20 chunk summaries were finished" in err
    assert "the server closed the connection" in err and "Traceback" not in err
    code = run([*args, "--chunk-tokens", "200", "--overlap", "0", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == BackendError.exit_code and data["partial"] is True and data["partials"] == ["Part 0.", "Part 1."]


def test_ctrl_c_while_the_text_is_counted_is_an_interrupted_summary(tok):
    """Ctrl-C before the first model call (a long text is still being counted and cut) used to leave
    `--json` with no output at all."""
    from gptcli.summarize import SummaryInterrupted, SummaryOptions

    s = summarizer(ReadingBackend(tok, 4096), tok)

    def count(text):
        raise KeyboardInterrupt

    s.count = count
    with pytest.raises(SummaryInterrupted) as stop:
        s.run(document(20), SummaryOptions())
    result = stop.value.result
    assert result.interrupted and result.partials == [] and result.as_dict()["partial"] is True


def test_ctrl_c_while_the_model_loads_still_gives_json_its_partial_object(tiny_models, tmp_path, monkeypatch, capsys):
    """README: with --json, Ctrl-C prints the object marked partial, also before the first chunk is done; during
    the model's load (a first run converts it: tens of seconds) stdout was empty."""
    import io
    import sys

    from gptcli.cli import local_run
    from gptcli.cli.app import run

    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(local_run, "load_runtime", interrupted)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    doc = tmp_path / "doc.txt"
    doc.write_text("The river rose.\n")
    code = run(["summarize", str(doc), "-m", str(tiny_models["llama"]), "--json"])
    out, err = capsys.readouterr()
    assert code == 130, err
    assert json.loads(out)["partial"] is True and json.loads(out)["partials"] == []
    assert "interrupted: no summary yet" in err


def test_chunks_of_cjk_and_emoji_text_never_cut_a_character_in_two(tok):
    """A byte-level tokenizer spells a CJK character or an emoji in several tokens: a chunk cut (a paragraph with
    no sentence break the splitter knows, as Japanese has none followed by a space) or an overlap tail that fell
    between them turned the character into U+FFFD on both sides, dropping it from the text the model read."""
    from gptcli.config import SamplingConfig
    from gptcli.summarize import Summarizer
    from gptcli.templates import get_template

    template, sampling = get_template("summarize"), SamplingConfig(max_tokens=16)
    s = Summarizer(None, tok, template, sampling, calls=lambda *a: iter(()), context_length=600)
    text = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。😀🎉🐈" * 12
    assert "\ufffd" not in text and len(tok.encode("吾", add_special_tokens=False)) > 1  # several tokens a character
    for budget in (17, 40, 101):
        pieces = s.cut(text, budget)
        assert "".join(pieces) == text and all(len(tok.encode(p, add_special_tokens=False)) <= budget for p in pieces)
    for overlap in (0, 7, 20):
        chunks = s.chunk(text, 60, overlap)
        assert len(chunks) > 3 and not [c for c in chunks if "\ufffd" in c]
    assert "\ufffd" not in s._clip("名前はまだ無い" * 20, 25)


def test_the_partial_json_object_has_the_keys_of_the_whole_one(tiny_models, tok, tmp_path, monkeypatch, capsys):
    """`--json` cut short (Ctrl-C, or a server that went away) printed the object without `model`, `backend` and
    `device` (with --url: `model` and `url`), so a script reading the finished object's keys failed on it."""
    from gptcli.cli import local_run, summarize_cmd
    from gptcli.cli.app import run
    from gptcli.config import SamplingConfig
    from gptcli.errors import BackendError
    from gptcli.summarize import Summarizer

    doc = tmp_path / "doc.txt"
    doc.write_text(document(20))

    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(local_run, "load_runtime", interrupted)
    assert run(["summarize", str(doc), "-m", str(tiny_models["llama"]), "--json"]) == 130
    data = json.loads(capsys.readouterr().out)
    assert data["partial"] is True and data["model"] is None and data["backend"] is None and data["device"] is None
    assert data["parallel"] is None  # it was 1: chosen from the KV budget once the model is loaded, so not yet
    assert run(["summarize", str(doc), "-m", str(tiny_models["llama"]), "--json", "-P", "3"]) == 130
    assert json.loads(capsys.readouterr().out)["parallel"] == 3  # asked for

    def failing_summarizer(remote, settings, template, **options):
        calls = _calls_failing_after([1, 0], BackendError("the server closed the connection"))
        summarizer = Summarizer(None, tok, template, SamplingConfig(max_tokens=16), calls=calls, context_length=600)
        return summarizer, {"model": "m", "url": "http://127.0.0.1:9/v1"}

    monkeypatch.setattr(summarize_cmd, "_summarizer", failing_summarizer)
    args = ["summarize", str(doc), "--url", "http://127.0.0.1:9/v1", "-m", "m", "--chunk-tokens", "200", "--json"]
    assert run([*args, "--strategy", "map-reduce", "--overlap", "0"]) == BackendError.exit_code
    data = json.loads(capsys.readouterr().out)
    assert data["partials"] == ["Part 0.", "Part 1."] and (data["model"], data["url"]) == ("m", "http://127.0.0.1:9/v1")


def test_the_prompt_token_total_is_null_where_a_server_did_not_say_one_calls_count():
    from gptcli.summarize import Call, SummaryResult

    def result(*counts):
        calls = [Call("map", 0, count, 10, 5, 0.1, "stop") for count in counts]
        return SummaryResult("s", "map-reduce", 20, 600, 200, calls=calls).as_dict()

    assert result(12, 30)["prompt_tokens"] == 42
    assert result(12, None)["prompt_tokens"] is None  # not 12: one call's count is not known
