"""Perplexity over any backend: the window plan, agreement with a direct computation, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gptcli.backends.base import LoadOptions
from gptcli.backends.torch_backend import TorchBackend
from gptcli.errors import InputError, ModelError, UsageError
from gptcli.evaluate import encode_file_start, encode_text, log_probs, perplexity, plan_windows
from gptcli.textio import EVAL_TEXT
from gptcli.tokenizer import Tokenizer
from tests.conftest import CORPUS, run_cli

CPU32 = LoadOptions(device="cpu", dtype="float32")


@pytest.mark.parametrize(("n", "window", "stride"), [(10, 4, 2), (100, 32, 16), (7, 64, 32), (50, 8, 7)])
def test_window_plan_scores_every_position_once(n, window, stride):
    scored = []
    for begin, first, end in plan_windows(n, window, stride):
        assert begin < first < end <= begin + window
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_log_probs_are_a_log_softmax_per_row():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1000.0]], dtype=np.float32)
    expected = 2.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3))
    got = log_probs(logits, np.array([1, 2]))
    assert got[0] == pytest.approx(expected) and got[1] == pytest.approx(0.0)


def _direct_nll(folder, ids):
    """Mean NLL from one full-sequence forward of the transformers model (a single window)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).mean()
    return float(nll)


def test_single_window_matches_a_direct_computation(tiny_models):
    folder = tiny_models["llama"]
    ids = Tokenizer(folder).encode(CORPUS[0] + " " + CORPUS[4])[:60]
    result = perplexity(TorchBackend.load(folder, CPU32), ids)
    assert result.windows == 1 and result.scored_tokens == len(ids) - 1
    assert result.mean_nll == pytest.approx(_direct_nll(folder, ids), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.mean_nll))


def test_no_pass_reads_more_positions_than_the_engine_reads_of_a_prompt(tiny_models, monkeypatch):
    """A pass's positions were bounded by the logits alone: a 400-token vocabulary and a 100,000-token window made
    passes of 41,943 positions, whose attention took 17 GB (killed by the kernel). Here at a 9-position bound."""
    import gptcli.evaluate

    folder = tiny_models["llama"]
    ids = Tokenizer(folder).encode(" ".join(CORPUS))[:100]
    backend = TorchBackend.load(folder, CPU32)
    whole = perplexity(backend, ids, window=64, stride=24)
    monkeypatch.setattr(gptcli.evaluate, "DEFAULT_PREFILL_CHUNK", 9)
    lengths = []
    for name in ("forward", "score"):
        real = getattr(backend, name)
        monkeypatch.setattr(
            backend, name, lambda ids, cache, real=real: (lengths.append(len(ids)), real(ids, cache))[1]
        )
    chunked = perplexity(backend, ids, window=64, stride=24)
    assert max(lengths) == 9 and chunked.scored_tokens == whole.scored_tokens
    assert chunked.mean_nll == pytest.approx(whole.mean_nll, rel=1e-5)


def test_strided_windows_on_onnx_match_torch(tiny_models):
    from gptcli.backends.onnx_backend import OnnxBackend

    folder = tiny_models["gpt2"]
    ids = Tokenizer(folder).encode(" ".join(CORPUS[:6]))[:150]
    a = perplexity(TorchBackend.load(folder, CPU32), ids, window=48, stride=16)
    b = perplexity(OnnxBackend.load(folder, CPU32), ids, window=48, stride=16)
    assert a.windows == b.windows > 3
    assert b.perplexity == pytest.approx(a.perplexity, rel=1e-4)


def test_bad_arguments(tiny_models):
    backend = TorchBackend.load(tiny_models["gpt2"], CPU32)
    with pytest.raises(InputError):
        perplexity(backend, [1])
    with pytest.raises(UsageError):
        perplexity(backend, [1, 2, 3], window=10_000)
    with pytest.raises(UsageError):
        perplexity(backend, [1, 2, 3], window=8, stride=9)
    # a tokenizer with tokens past the embeddings (added without resizing them): an IndexError in the model
    with pytest.raises(ModelError, match="past the model's"):
        perplexity(backend, [1, backend.info.vocab_size, 3])


def test_nan_logits_are_a_model_error_not_a_nan_perplexity(tiny_models, monkeypatch):
    # damaged weights or an overflow in bf16/fp16: `--json` printed "perplexity": NaN (not JSON), exit 0
    import gptcli.evaluate

    real = gptcli.evaluate.score_positions

    def nan_scores(backend, ids, cache):
        logits, cache = real(backend, ids, cache)
        return np.full_like(logits, np.nan), cache

    monkeypatch.setattr(gptcli.evaluate, "score_positions", nan_scores)
    backend = TorchBackend.load(tiny_models["gpt2"], CPU32)
    with pytest.raises(ModelError, match="NaN log-probabilities") as raised:
        perplexity(backend, list(range(2, 40)))
    assert "--dtype float32" in raised.value.hint


def test_logits_too_sure_of_the_wrong_tokens_are_a_model_error_not_an_overflow(tiny_models, monkeypatch):
    # a mean NLL over 709.8 nats: math.exp raised OverflowError, an internal error (exit 1)
    import gptcli.evaluate

    real = gptcli.evaluate.score_positions

    def wrong_by_far(backend, ids, cache):
        logits, cache = real(backend, ids, cache)
        logits = np.zeros_like(logits)
        logits[:, 0] = 1e4  # every position bets everything on token 0
        return logits, cache

    monkeypatch.setattr(gptcli.evaluate, "score_positions", wrong_by_far)
    backend = TorchBackend.load(tiny_models["gpt2"], CPU32)
    with pytest.raises(ModelError, match="perplexity is too large to compute: mean NLL 10000 nats per token"):
        perplexity(backend, list(range(2, 40)))


def test_cli_perplexity_json_and_text(tiny_models, tmp_path):
    text = tmp_path / "holdout.txt"
    text.write_text(" ".join(CORPUS[:3]), encoding="utf-8")
    folder = str(tiny_models["llama"])
    result = run_cli("eval", "perplexity", str(text), "-m", folder, "--backend", "onnx", "--json")
    assert result.returncode == 0, result.stderr.decode()
    record = json.loads(result.stdout)
    assert record["backend"] == "onnx" and record["dtype"] == "fp32" and record["perplexity"] > 1
    # float32 on torch too: --dtype auto is bf16 on a CPU that computes it natively
    torch_run = run_cli("eval", "perplexity", str(text), "-m", folder, "--dtype", "float32", "--json")
    assert json.loads(torch_run.stdout)["perplexity"] == pytest.approx(record["perplexity"], rel=1e-4)
    plain = run_cli("eval", "perplexity", str(text), "-m", folder, "--window", "32", "-n", "50")
    lines = plain.stdout.decode().splitlines()
    assert lines[0].startswith("perplexity  ") and "49 scored of 50" in plain.stdout.decode()


def test_cli_perplexity_input_errors(tiny_models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    folder = str(tiny_models["gpt2"])
    result = run_cli("eval", "perplexity", str(empty), "-m", folder)
    assert result.returncode == 6 and result.stderr.decode().startswith("error: ")
    missing = run_cli("eval", "perplexity", str(tmp_path / "nope.txt"), "-m", folder)
    assert missing.returncode == 6 and "file not found" in missing.stderr.decode()
    assert missing.stdout == b""
    text = tmp_path / "text.txt"
    text.write_text("some words to score " * 20)
    # Out-of-range options are usage errors (exit 2); 0 was once taken silently as "the default".
    for option, value, message in [
        ("--window", "0", "error: --window must be in 2.."),
        ("--stride", "0", "error: --stride must be in 1.."),
        ("-n", "1", "error: --max-tokens must be at least 2"),
    ]:
        result = run_cli("eval", "perplexity", str(text), "-m", folder, option, value)
        assert result.returncode == 2 and result.stderr.decode().startswith(message), (option, result.stderr)


def test_max_tokens_reads_only_the_start_of_a_file_over_the_size_limit(tiny_models, tmp_path):
    """`eval perplexity big.txt -n 2000` on a file over the 64 MiB limit was refused for its size (exit 6),
    though only its start is scored: with -n only what the first N tokens take is read."""
    big = tmp_path / "big.txt"
    with big.open("wb") as handle:
        handle.write(" ".join(CORPUS * 20).encode())  # ~140 KiB of text
        handle.truncate(EVAL_TEXT.max_bytes + 1)  # then a sparse tail past the limit (never read)
    folder = str(tiny_models["llama"])
    result = run_cli("eval", "perplexity", str(big), "-m", folder, "--window", "64", "-n", "3000", "--json")
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["total_tokens"] == 3000
    whole = run_cli("eval", "perplexity", str(big), "-m", folder, "--window", "64")  # -n or not, the limit holds
    assert whole.returncode == 6 and "over the 64 MiB limit" in whole.stderr.decode()


def test_the_start_of_a_file_encodes_as_the_whole_text_does(tiny_models, tmp_path, monkeypatch):
    import gptcli.evaluate

    monkeypatch.setattr(gptcli.evaluate, "HEAD_BYTES_PER_TOKEN", 1)  # a guess short of what tokens take: read on
    tok = Tokenizer(tiny_models["llama"])
    text = "\n".join(CORPUS * 300)
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    for wanted in (2, 40000, 10**6):  # within the first read (~30k tokens), past it, more than the file holds
        assert encode_file_start(tok, path, EVAL_TEXT, wanted).tolist() == encode_text(tok, text, wanted).tolist()


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_prints_the_perplexity_of_what_was_scored_and_exits_130(
    tiny_models, tmp_path, monkeypatch, capsys, as_json
):
    """Ctrl-C during `eval perplexity` exited 130 with nothing of the part already scored."""
    import gptcli.evaluate
    from gptcli.cli.app import run

    real, calls = gptcli.evaluate.score_positions, []

    def interrupted_at_the_third_window(backend, ids, cache):
        calls.append(len(ids))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(backend, ids, cache)

    monkeypatch.setattr(gptcli.evaluate, "score_positions", interrupted_at_the_third_window)
    text = tmp_path / "long.txt"
    text.write_text(" ".join(CORPUS), encoding="utf-8")
    args = ["eval", "perplexity", str(text), "-m", str(tiny_models["llama"]), "--window", "16", "--stride", "16"]
    code = run([*args, "-n", "100", "--dtype", "float32"] + (["--json"] if as_json else []))
    out, err = capsys.readouterr()
    scored = sum(calls[:2])
    assert code == 130, err
    assert f"interrupted after {scored} of 93 tokens: the perplexity is of those" in err
    if as_json:
        record = json.loads(out)
        assert record["partial"] is True and record["scored_tokens"] == scored and record["to_score"] == 93
        assert record["perplexity"] == pytest.approx(math.exp(record["mean_nll"]))
    else:
        assert out.startswith("perplexity  ") and f"tokens      {scored} scored of 100" in out


def test_ctrl_c_while_the_model_loads_still_gives_json_its_partial_object(tiny_models, tmp_path, monkeypatch, capsys):
    """It exited 130 with stdout empty: a script reading --json had nothing to parse (generate's gets its object)."""
    import gptcli.cli.local_run
    from gptcli.cli.app import run

    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(gptcli.cli.local_run, "load_runtime", interrupted)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(CORPUS), encoding="utf-8")
    assert run(["eval", "perplexity", str(text), "-m", str(tiny_models["llama"]), "--json"]) == 130
    record = json.loads(capsys.readouterr().out)
    assert record["partial"] is True and record["perplexity"] is None and record["scored_tokens"] == 0
    assert record["file"] == str(text) and record["model"] is None
    assert run(["eval", "perplexity", str(text), "-m", str(tiny_models["llama"])]) == 130
    assert capsys.readouterr().out == ""  # no object asked for: nothing on stdout, as before


class _NoScore:
    """A backend seen without its native `score`: perplexity falls back to one forward per token."""

    def __init__(self, backend):
        self.backend, self.info = backend, backend.info

    def new_cache(self):
        return self.backend.new_cache()

    def forward(self, ids, cache):
        return self.backend.forward(ids, cache)


@pytest.mark.parametrize(("backend_name", "model"), [("torch", "llama"), ("onnx", "llama"), ("onnx", "gpt2")])
def test_native_scoring_gives_the_token_by_token_perplexity(tiny_models, monkeypatch, backend_name, model):
    import gptcli.evaluate as evaluate
    from gptcli.backends.onnx_backend import OnnxBackend

    cls = TorchBackend if backend_name == "torch" else OnnxBackend
    backend = cls.load(tiny_models[model], CPU32)
    assert hasattr(backend, "score")
    ids = Tokenizer(tiny_models[model]).encode(" ".join(CORPUS[:6]))[:150]
    # Small passes: several per window, so the passes' seams are crossed too.
    monkeypatch.setattr(evaluate, "SCORE_LOGITS_BYTES", 4 * backend.info.vocab_size * 7)
    native = perplexity(backend, ids, window=48, stride=16)
    looped = perplexity(_NoScore(backend), ids, window=48, stride=16)
    assert native.scored_tokens == looped.scored_tokens == len(ids) - 1
    assert native.mean_nll == pytest.approx(looped.mean_nll, rel=1e-5)


def test_scoring_hf_engine_matches_its_decoding(tiny_models, monkeypatch):
    from gptcli.testing import check_scoring

    monkeypatch.setenv("GPTCLI_TORCH_IMPL", "hf")
    backend = TorchBackend.load(tiny_models["llama"], CPU32)
    assert backend.implementation == "hf"
    check_scoring(backend, Tokenizer(tiny_models["llama"]).encode(CORPUS[0])[:12])


def test_a_model_whose_weights_hold_nan_is_a_model_error_in_generate_too(tiny_models, tmp_path, capsys, monkeypatch):
    """generate said exit 4 (backend unavailable) with no word of the weights, where eval says exit 5 (the model):
    a built-in backend's NaN logits are the model's (damaged weights, or a float16 overflow such as Gemma's)."""
    import io
    import shutil

    from safetensors.torch import load_file, save_file

    from gptcli.cli.app import run

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_models["llama"], damaged)
    weights = load_file(damaged / "model.safetensors")
    name = next(k for k in weights if k.endswith("norm.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no piped text: the prompt is the argument
    capsys.readouterr()
    assert run(["generate", "-m", str(damaged), "-n", "2", "--backend", "torch", "hi"]) == 5
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: the model gives NaN logits (backend 'torch'")
    assert lines[1] == "hint: try --dtype float32 (--precision fp32 on onnx); if NaN again, the weights are damaged"
