"""A GGUF's first use converts it (~12 s for the default model): the steps are reported as they go, drawn
on stderr (a bar in a terminal, plain lines in a log), never on stdout; Ctrl-C says so and keeps nothing."""

from __future__ import annotations

import io
import re

import pytest

from gptcli.cli import render
from gptcli.cli.app import run
from gptcli.models import models_dir, resolve_model

STEPS = ["loading transformers", "reading the tokenizer", "reading the weights", "checking the conversion"]
STEPS += ["writing safetensors"]


@pytest.fixture(autouse=True)
def empty_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # generate reads a piped stdin first


def leftovers() -> list[str]:
    return [p.name for p in models_dir().parent.rglob("*") if p.name.startswith((".tmp-", ".old-"))]


def test_the_conversion_reports_each_step_in_order(tiny_gguf):
    updates, notes = [], []
    model = resolve_model(str(tiny_gguf), notify=notes.append, progress=lambda *update: updates.append(update))
    assert (model.path / "model.safetensors").is_file()
    assert [done for _, done, _, _ in updates] == list(range(len(STEPS) + 1))  # one step after the other
    assert {(stage, total) for stage, _, total, _ in updates} == {("converting tiny.gguf", len(STEPS))}
    assert [detail for *_, detail in updates] == [*STEPS, "done"]
    assert notes[0].startswith("converting tiny.gguf to safetensors (once; cached in ")
    assert re.fullmatch(r"converted tiny\.gguf in \d+ s", notes[-1])
    updates.clear()
    resolve_model(str(tiny_gguf), progress=lambda *update: updates.append(update))
    assert updates == []  # converted once: the next start reads the cache


def test_every_file_of_a_converted_model_has_the_mode_a_new_file_gets(tiny_gguf):
    """QA: safetensors wrote the weights 0600 beside 0644 files: another user of a shared GPTCLI_HOME could not load
    the default model ("cannot write .../model.safetensors: Permission denied")."""
    from gptcli.atomicio import default_mode

    folder = resolve_model(str(tiny_gguf)).path
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir() if path.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {default_mode()}, modes


def test_the_conversion_parses_the_gguf_once_and_leaves_gguf_as_it_was(tiny_gguf, monkeypatch):
    """transformers parsed the file three times (tokenizer, config, weights: ~2.5 s each for the default model)."""
    import gguf

    built = gguf.GGUFReader
    parsed = []

    def counting(*args, **kwargs):
        parsed.append(args[0])
        return built(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    model = resolve_model(str(tiny_gguf))
    assert (model.path / "model.safetensors").is_file()
    assert len(parsed) == 1
    assert gguf.GGUFReader is counting  # put back: nothing after the conversion shares its reader


def test_a_log_gets_one_plain_line_per_step_and_stdout_only_the_text(tiny_gguf, capsys):
    assert run(["generate", "-m", str(tiny_gguf), "hi", "-n", "3", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert "convert" not in out and out.endswith("\n")  # stdout is the product: the text alone
    assert "\r" not in err and "\x1b" not in err  # no bar redrawn in place in a CI log
    lines = err.splitlines()
    steps = [line for line in lines if line.startswith("converting tiny.gguf: ")]
    assert [re.sub(r" \(\d+ s\)$", "", line.split(": ", 1)[1]) for line in steps] == STEPS
    assert re.fullmatch(r"converted tiny\.gguf in \d+ s", lines[lines.index(steps[-1]) + 1])


def test_quiet_shows_no_conversion_steps(tiny_gguf, capsys):
    assert run(["-q", "generate", "-m", str(tiny_gguf), "hi", "-n", "3"]) == 0
    assert capsys.readouterr().err == ""


def test_ctrl_c_in_the_conversion_says_nothing_was_kept_and_the_next_run_converts(tiny_gguf, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", interrupted)
        assert run(["generate", "-m", str(tiny_gguf), "hi", "-n", "3"]) == 130
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1] == (
        "interrupted: tiny.gguf was not converted; nothing was kept, the next run converts it again"
    )
    assert leftovers() == [] and not any(models_dir().iterdir())
    assert run(["generate", "-m", str(tiny_gguf), "hi", "-n", "3"]) == 0
    assert "converted tiny.gguf in" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_note_during_a_live_bar_is_printed_above_it_through_the_same_console(monkeypatch):
    """A note from its own console was written after the bar on the bar's line, and the bar redrawn over it."""
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setenv("TERM", "xterm")
    with render.StageProgress(plain_lines=True) as progress:
        progress("converting tiny.gguf", 1, 5, "reading the tokenizer")
        render.note("a note while the bar runs")
        progress("converting tiny.gguf", 2, 5, "reading the weights")
    drawn = terminal.getvalue()
    assert "reading the tokenizer" in drawn  # a bar was drawn, not plain lines
    assert re.search(r"\r\x1b\[2K(\x1b\[[0-9;]*m)*a note while the bar runs", drawn), repr(drawn)
    assert render.stderr_console() is render.stderr_console()


def test_a_gguf_cut_short_says_so_with_both_sizes_before_converting(tiny_gguf, tmp_path, capsys):
    """A cut-short file failed deep in transformers' reader: 'cannot reshape array of size … into shape …'."""
    whole = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) - 1000])
    assert run(["generate", "-m", str(cut), "hi", "-n", "3"]) == 5
    out, err = capsys.readouterr()
    assert out == "" and "converting" not in err
    assert err.splitlines() == [
        f"error: cannot read GGUF file {cut}: it is cut short "
        f"(a complete file has {len(whole)} bytes, this one {len(whole) - 1000})",
        "hint: the file is incomplete (an interrupted download or copy?): download or copy it again",
    ]
    cut.write_bytes(whole[:200])  # cut inside the metadata: no tensor told where the data ends
    assert run(["generate", "-m", str(cut), "hi"]) == 5
    assert "it is cut short in its header (200 bytes)" in capsys.readouterr().err
    assert not models_dir().exists()  # stopped before a temporary folder was made


@pytest.mark.parametrize(
    ("content", "said"),
    [(b"", "it is empty"), (b"PK\x03\x04 a zip", "it is not a GGUF file (it does not start with 'GGUF')")],
)
def test_an_empty_file_or_one_that_is_no_gguf_says_which(content, said, tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    assert run(["generate", "-m", str(path), "hi"]) == 5
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[0] == f"error: cannot read GGUF file {path}: {said}"


def test_a_full_disk_in_the_conversion_is_one_line_naming_the_cache_and_keeps_nothing(tiny_gguf, capsys, monkeypatch):
    """safetensors reports a full disk as a SafetensorError ('... No space left on device (os error 28)'):
    it ended with 'internal error: SafetensorError: ...' (exit 1, the hint to set GPTCLI_DEBUG)."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.modeling_utils, "safe_save_file", full)
        assert run(["generate", "-m", str(tiny_gguf), "hi", "-n", "3"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        rf"error: cannot write {re.escape(str(models_dir()))}/gguf-tiny-\w+: No space left on device", err[-2]
    )
    assert err[-1] == "hint: free some space, or set GPTCLI_HOME to a folder on another disk"
    assert leftovers() == [] and not any(models_dir().iterdir())
    assert run(["generate", "-m", str(tiny_gguf), "hi", "-n", "3"]) == 0  # space again: it converts


def test_a_converted_gguf_ends_replies_where_llama_cpp_does(tiny_gguf, tiny_models):
    """A GGUF names one EOS (Gemma 3's is <eos>, while its turns end with <end_of_turn>); llama.cpp also ends a
    reply at its end-of-generation tokens, known by their text. A model converted from a GGUF does too (also a
    copy converted before); the same tokens in a Hugging Face folder keep what its configs say."""
    from gptcli.tokenizer import Tokenizer

    tok = Tokenizer(resolve_model(str(tiny_gguf)).path)
    im_end, endoftext = tok._tok.token_to_id("<|im_end|>"), tok._tok.token_to_id("<|endoftext|>")
    assert tok.eos_ids == {im_end, endoftext}  # the GGUF says <|im_end|> only
    assert Tokenizer(tiny_models["llama"]).eos_ids == {im_end}  # its generation_config's own


def _nothing_built(*args, **kwargs):
    raise AssertionError("transformers built a model from the GGUF")


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("llama.block_count", 4_000_000_000, "must be a positive integer, at most 16,777,216"),
        ("llama.block_count", 100_000, "its tensors hold 2 layers"),
        ("llama.attention.head_count_kv", 3, "does not divide 4 attention heads"),
        ("llama.attention.layer_norm_rms_epsilon", -1.0, "must be a positive number"),
    ],
)
def test_an_impossible_gguf_header_value_is_refused_before_transformers_builds_a_model(
    key, value, why, tiny_gguf, tmp_path, capsys, monkeypatch
):
    """QA: llama.block_count = 4,000,000,000 grew memory ~50 MB/s without limit (transformers built the layers one
    by one before any check); the config.json checks now run on the header's values, naming the GGUF's key."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_gguf import patched_gguf

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _nothing_built)
    damaged = patched_gguf(tiny_gguf, tmp_path / "damaged.gguf", key, value)
    assert run(["generate", "hi", "-n", "4", "-m", str(damaged)]) == 5
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"error: {damaged}: {key} = {value!r} is impossible ({why})",
        "hint: the file is damaged, or not a model gptcli can run: download it again, or use another file",
    ]
    assert not models_dir().exists()


def test_a_gguf_with_context_length_0_is_not_converted_and_each_run_blames_the_gguf(tiny_gguf, tmp_path, capsys):
    """QA: it was converted and cached; the error named gptcli's config.json ('fix or replace the config.json'), and
    the next run called gptcli's copy damaged ('delete ..., the next run makes it again': it made the same)."""
    from tests.tiny_gguf import patched_gguf

    damaged = patched_gguf(tiny_gguf, tmp_path / "ctx0.gguf", "llama.context_length", 0)
    said = [
        f"error: {damaged}: llama.context_length = 0 is impossible (must be a positive integer, at most 16,777,216)",
        "hint: the file is damaged, or not a model gptcli can run: download it again, or use another file",
    ]
    for _ in range(2):
        assert run(["models", "info", str(damaged)]) == 5
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines() == said
        assert not models_dir().exists()  # nothing converted, nothing cached


def _nested_gguf(path, levels: int):
    """A GGUF whose one metadata value is an empty uint32 array inside `levels - 1` arrays, and no tensor."""
    import struct

    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a" + struct.pack("<I", 9)
    data += struct.pack("<IQ", 9, 1) * (levels - 1) + struct.pack("<IQ", 4, 0)
    path.write_bytes(data + b"\0" * (-len(data) % 32))  # the (empty) data section starts aligned
    return path


def test_a_gguf_header_nesting_arrays_200000_deep_is_a_corrupt_file_not_an_internal_error(tmp_path, capsys):
    """QA: 'internal error: RecursionError' (exit 1): each nested array was a Python call."""
    nested = _nested_gguf(tmp_path / "nest.gguf", 200_000)
    assert run(["models", "info", str(nested)]) == 5
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"error: cannot read GGUF file {nested}: its metadata nests arrays more than 8 deep"
        " (real GGUFs nest one or two)",
        "hint: the file is damaged, or not a model gptcli can run: download it again, or use another file",
    ]


def test_arrays_nested_8_deep_are_read_and_9_deep_are_refused(tmp_path):
    from gptcli.errors import ModelError
    from gptcli.gguf_header import check_gguf_file

    header = check_gguf_file(_nested_gguf(tmp_path / "eight.gguf", 8))
    assert header is not None and header.metadata == {} and header.tensors == ()
    with pytest.raises(ModelError, match="nests arrays more than 8 deep"):
        check_gguf_file(_nested_gguf(tmp_path / "nine.gguf", 9))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_gguf_whose_model_gives_nan_logits_is_a_damaged_file_not_gptclis_bug(value, tiny_gguf, tmp_path, capsys):
    """QA: a GGUF that makes its model output NaN was 'converting eps.gguf changed the model's outputs / hint: report
    this bug' (allclose is False wherever NaN is); the file is at fault, and nothing is cached."""
    from tests.tiny_gguf import poisoned_gguf

    damaged = poisoned_gguf(tiny_gguf, tmp_path / "nan.gguf", "output_norm.weight", value)
    assert run(["-q", "models", "info", str(damaged)]) == 5
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"error: cannot convert GGUF file {damaged}: its model gives NaN or infinite logits"
        " (damaged weights or metadata)",
        "hint: the file is damaged, or not a model gptcli can run: download it again, or use another file",
    ]
    assert leftovers() == [] and not any(models_dir().iterdir())


def test_outputs_the_rebuilt_model_changes_are_still_gptclis_bug(tiny_gguf, capsys, monkeypatch):
    import torch

    rebuilt = torch.nn.Module.load_state_dict

    def changed(module, state, *args, **kwargs):
        state = dict(state)
        state["model.norm.weight"] = state["model.norm.weight"] * 2
        return rebuilt(module, state, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", changed)
    assert run(["-q", "models", "info", str(tiny_gguf)]) == 5
    assert capsys.readouterr().err.splitlines() == [
        "error: converting tiny.gguf changed the model's outputs",
        "hint: report this bug",
    ]
