"""`gptcli train` end to end on the tiny preset: real data, real models, real processes."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gptcli.cli.app import run
from tests.conftest import REPO, TRAIN_TEXT, run_cli


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("sample")) for r in records(run_dir)]


def train_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_cli("train", "--preset", "tiny", *args, **kwargs)


def test_tiny_run_is_a_model_every_command_loads(corpus, tmp_path):
    out = tmp_path / "run"
    result = train_cli("--data", str(corpus), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)  # stdout holds only the summary
    assert summary["steps"] == 20 and summary["interrupted"] is False
    # An untrained model scores about ln(vocab): 4.08 on Shakespeare's 59 characters (TRAIN_TEXT: 3.61 on 36).
    # The 20 steps reach 3.52 (TRAIN_TEXT: 3.11).
    assert summary["val_loss"] < math.log(summary["vocab_size"]) - 0.25
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "loss.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000010", "step-0000020"]
    assert json.loads((out / "run.json").read_text())["latest"] == "step-0000020"
    steps = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    from gptcli.hardware import peak_flops

    if peak_flops("cpu", False):  # MFU against cores x clock x SIMD when the clock is readable
        assert all(0 < r["mfu"] < 1 for r in steps)
    evals = [r for r in records(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and all(r["sample"].startswith("\n") for r in evals)
    assert "val loss" in result.stderr.decode()

    generated = run_cli("generate", "--model", str(out), "--raw", "ROMEO:", "--max-tokens", "8", "--seed", "1")
    assert generated.returncode == 0, generated.stderr.decode()
    assert generated.stdout.decode().strip()

    listed = run_cli("runs", "list", str(tmp_path), "--json")
    assert listed.returncode == 0
    assert [Path(r["run"]).name for r in json.loads(listed.stdout)] == ["run"]
    table = run_cli("runs", "list", str(tmp_path)).stdout.decode().splitlines()
    assert table[0].startswith("run ") and table[1].startswith(str(out))  # flush left, as every other list
    shown = run_cli("runs", "show", str(out), "--json")
    assert json.loads(shown.stdout)["config"]["model"]["n_layer"] == 1
    # By the name `runs list` shows, from the folder that holds ./runs.
    here = tmp_path / "project"
    here.mkdir()
    (here / "runs").symlink_to(tmp_path)
    by_name = subprocess.run(
        [sys.executable, "-m", "gptcli", "runs", "show", "run", "--json"], cwd=here, capture_output=True
    )
    assert by_name.returncode == 0, by_name.stderr.decode()
    assert json.loads(by_name.stdout)["config"]["model"]["n_layer"] == 1


def test_char_tokenizer_is_a_real_tokenizer_json(corpus, tmp_path):
    from gptcli.tokenizer import Tokenizer
    from gptcli.train.data import _encode, char_tokenizer

    text = corpus.read_text()[:2000]
    tok = char_tokenizer(text)
    assert _encode(tok, [text], "char", None).tolist() == tok.encode(text).ids
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    reloaded = Tokenizer(tmp_path)
    sample = text[100:160]
    assert reloaded.decode(reloaded.encode(sample)) == sample
    assert reloaded.decode(reloaded.encode("\x07")) == ""  # unseen characters become <unk>
    assert reloaded.vocab_size == len(set(text)) + 1  # + <unk>


def test_resume_continues_the_same_loss_curve_bit_for_bit(corpus, tmp_path, capsys):
    # In-process (fast); the SIGINT test below covers resume across real processes.
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert run(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(whole)]) == 0
    assert run(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(halves), "--max-iters", "10"]) == 0
    stale = halves / "checkpoints" / ".tmp-step-0000015-999"
    shutil.copytree(halves / "checkpoints" / "step-0000010", stale)  # what a kill -9 mid-save leaves behind
    capsys.readouterr()
    assert run(["train", "--resume", str(halves), "--max-iters", "20"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert curve(halves) == curve(whole)
    assert not stale.exists()


def test_resume_reuses_the_saved_settings(corpus, tmp_path, capsys):
    """No --data, --preset or --set on --resume: the run's own data and settings, not the preset's."""
    from gptcli.train import checkpoint

    out = tmp_path / "run"
    sets = ["--set", "eval.interval=3", "--set", "checkpoint.interval=3", "--set", "checkpoint.keep_last=5"]
    argv = ["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--max-iters", "4", *sets]
    assert run([*argv, "--lr", "1e-3"]) == 0, capsys.readouterr().err
    assert run(["train", "--resume", str(out), "--max-iters", "8"]) == 0, capsys.readouterr().err
    assert [r["step"] for r in records(out) if "val_loss" in r] == [3, 4, 6, 8]  # eval.interval 3, as saved
    kept = ["step-0000003", "step-0000004", "step-0000006", "step-0000008"]  # checkpoint.interval 3, keep_last 5
    assert [p.name for p in checkpoint.list_checkpoints(out)] == kept
    assert [r["lr"] for r in records(out) if "lr" in r][4] < 1e-3  # the saved --lr 1e-3, not the preset's 3e-3
    assert json.loads((out / "run.json").read_text())["data"] == str(corpus)


def test_sigint_saves_a_checkpoint_and_exits_130(corpus, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "NO_COLOR": "1"}
    never = ["--max-iters", "100000", "--set", "checkpoint.interval=100000", "--set", "eval.interval=100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcli", "train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), *never],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 90
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr.decode()
    assert "resume with: gptcli train --resume" in stderr.decode()
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and not checkpoints[0].name.startswith(".tmp")
    step = json.loads((out / "run.json").read_text())["step"]
    assert step >= 1
    resumed = run_cli("train", "--resume", str(out), "--max-iters", str(step + 2))
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, step + 3))


def test_ctrl_c_while_a_bpe_is_trained_says_what_it_stopped_and_that_nothing_was_saved(tmp_path):
    """Ctrl-C in the data steps (a BPE trained on the corpus, its tokens encoded) waited for the tokenizers
    library's Rust call to end, then exited 130 without a word; now it says which step it stopped and what
    is kept, at once (the call goes on in a thread the exit abandons)."""
    import random

    words = ["".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=3 + i % 7)) for i in range(20000)]
    rng = random.Random(0)
    corpus = tmp_path / "words.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(40000)), encoding="utf-8")
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--data", str(corpus), "--tokenizer", "bpe", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcli", *argv],
        cwd=REPO,
        env={**os.environ, "NO_COLOR": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    said = b""
    while b"tokenizing" not in said and (line := proc.stderr.readline()):  # the data is read: the BPE starts
        said += line
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    err = (said + stderr).decode()
    assert proc.returncode == 130, err
    # the step it stopped in (the BPE, most often; where the signal lands is the machine's timing)
    assert re.search(r"^interrupted before the first step \([^)]+\): nothing was saved$", err, re.M)
    assert "Traceback" not in err and not out.exists()


def test_ctrl_c_stops_the_wait_for_a_call_that_never_looks_at_signals():
    from gptcli.train.vocab import run_interruptibly

    release = threading.Event()  # stands for the Rust call: it ends only when it is done, not on Ctrl-C
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        run_interruptibly(lambda: release.wait(30), name="test-native-call")
    assert not release.is_set()  # the wait ended, the call had not
    release.set()
    assert run_interruptibly(lambda: 42, name="test-result") == 42
    with pytest.raises(ValueError, match="raised on the waiting thread"):
        run_interruptibly(lambda: int("raised on the waiting thread"), name="test-error")


def test_sighup_with_the_terminal_gone_still_saves_a_checkpoint(corpus, tmp_path):
    """Closing the terminal (or a dropped ssh session) killed the run as kill -9 does: the steps since the last
    checkpoint were lost. Now it stops as on SIGTERM, its output to the dead terminal silenced."""
    import pty

    out = tmp_path / "run"
    never = ["--max-iters", "100000", "--set", "checkpoint.interval=100000", "--set", "eval.interval=100000"]
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcli", "train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), *never],
        cwd=REPO,
        env={**os.environ, "NO_COLOR": "1"},
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (out / "metrics.jsonl").is_file():
            with contextlib.suppress(OSError):
                os.read(controller, 65536)  # keep the terminal drained while it runs
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGHUP)  # as the kernel hangs up: the signal, then writes fail (EIO)
        time.sleep(0.2)
    finally:
        os.close(controller)
    assert proc.wait(timeout=60) == 143
    checkpoints = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(checkpoints) == 1 and checkpoints[0].startswith("step-"), checkpoints
    assert json.loads((out / "run.json").read_text())["step"] >= 1


def test_sigterm_finishes_the_step_saves_a_checkpoint_and_exits_143(corpus, tmp_path, monkeypatch, capsys):
    # In-process: SIGTERM is raised during step 3. Were training not to handle it, the guard below fails the run.
    from gptcli.train import loop

    def not_handled(signum, frame):
        raise AssertionError("SIGTERM reached the test's own handler: training does not handle it")

    real_step, steps = loop.optimisation_step, []

    def step_then_sigterm(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(loop, "optimisation_step", step_then_sigterm)
    out = tmp_path / "run"
    never = ["--max-iters", "100000", "--set", "checkpoint.interval=100000", "--set", "eval.interval=100000"]
    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        code = run(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), *never])
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert code == 143, err  # as every command under SIGTERM (README, exit codes)
    assert f"resume with: gptcli train --resume {out}" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000003"]  # the step in flight finished
    assert json.loads((out / "run.json").read_text())["latest"] == "step-0000003"
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3]


def test_sigterm_during_a_long_evaluation_cuts_it_short_saves_and_exits_143(corpus, tmp_path, monkeypatch, capsys):
    # Was: the flag was read only after the evaluation, so `timeout` or a service manager waited for all of it.
    from gptcli.train import loop

    real_loss, batches = loop.loss_of, []

    def loss_then_sigterm(*args, **kwargs):
        batches.append(1)
        if len(batches) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "loss_of", loss_then_sigterm)
    out = tmp_path / "run"
    long_eval = ["--max-iters", "100", "--set", "eval.interval=2", "--set", "eval.iters=100000"]
    code = run(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), *long_eval])
    err = capsys.readouterr().err
    assert code == 143, err
    assert len(batches) < 10  # the evaluation stopped at the signal, not after 100,000 batches
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    assert not [r for r in records(out) if "val_loss" in r]  # a cut evaluation is not logged as one


def test_rotation_keeps_the_last_checkpoints_and_the_best(corpus, tmp_path, monkeypatch):
    from gptcli.train import checkpoint, loop

    val_losses = iter([3.0, 1.0, 2.0, 2.5, 2.6])  # evaluated at steps 2, 4, 6, 8, 10: the best is step 4
    monkeypatch.setattr(loop._Run, "_val_loss", lambda self: next(val_losses))
    out = tmp_path / "run"
    setup = loop.resolve_run(
        data_path=corpus,
        out=out,
        resume=None,
        preset="tiny",
        config_file=None,
        sets=["eval.interval=2", "checkpoint.interval=2", "checkpoint.keep_last=2"],
        flags={"train.max_iters": 10},
    )
    finished = loop.train(setup)
    assert finished.best_step == 4
    kept = [p.name for p in checkpoint.list_checkpoints(out)]
    assert kept == ["step-0000004", "step-0000008", "step-0000010"]  # the best, then the last two
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept
    run_info = json.loads((out / "run.json").read_text())
    assert (run_info["latest"], run_info["best"], run_info["best_val_loss"]) == ("step-0000010", 4, 1.0)
    assert checkpoint.load_state(out / "checkpoints" / "step-0000004")["step"] == 4


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_gradient_accumulation(corpus, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this Python")
    common = ["--data", str(corpus), "--max-iters", "4", "--set", "eval.interval=2", "--set", "checkpoint.interval=4"]
    ddp, accum = tmp_path / "ddp", tmp_path / "accum"
    launch = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "gptcli", "train", "--preset", "tiny"]
    result = subprocess.run(
        [*launch, *common, "--out", str(ddp)],
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert train_cli(*common, "--out", str(accum), "--grad-accum", "2").returncode == 0
    import torch
    from safetensors.torch import load_file

    a, b = load_file(ddp / "model.safetensors"), load_file(accum / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    ddp_losses = [r["loss"] for r in records(ddp) if "loss" in r]
    accum_losses = [r["loss"] for r in records(accum) if "loss" in r]
    assert ddp_losses == pytest.approx(accum_losses, rel=1e-5)


@pytest.mark.slow
def test_a_failure_on_rank_0_alone_stops_every_rank_with_its_one_error(corpus, tmp_path):
    # Rank 0 alone writes the run folder (here loss.png, which cannot replace a folder). The other rank was then in
    # the next step's collectives, waiting for a rank that was gone: it died on gloo's 'Connection closed by peer',
    # a second error (an internal one); with NCCL across machines it waited for the collective's timeout.
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this Python")
    out = tmp_path / "run"
    launch = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "gptcli", "train"]
    first = [*launch, "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--max-iters", "2"]
    result = subprocess.run([*first, "--set", "eval.interval=2"], cwd=REPO, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    (out / "loss.png").unlink()
    (out / "loss.png").mkdir()
    (out / "loss.png" / "keep").touch()
    resumed = [*launch, "--resume", str(out), "--max-iters", "6"]  # loss.png drawn at step 4, of 6
    result = subprocess.run(resumed, cwd=REPO, capture_output=True, timeout=60)  # a timeout: a rank kept waiting
    stderr = result.stderr.decode()
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0
    assert len(errors) == 1 and "loss.png" in errors[0], stderr[-3000:]


# ------------------------------------------------------------------ errors (in-process: fast)


def fails(argv: list[str], capsys, code: int) -> str:
    assert run(argv) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err  # one line, after any progress notes
    return err


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\x01\n")
    err = fails(["train", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "r")], capsys, 6)
    assert "no text" in err
    assert not (tmp_path / "r").exists()


def test_binary_corpus(tmp_path, capsys):
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    assert "binary" in fails(["train", "--data", str(tmp_path / "blob.txt")], capsys, 6)


def test_corpus_shorter_than_a_block(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("To be or not to be.")
    err = fails(["train", "--preset", "tiny", "--data", str(tmp_path / "short.txt")], capsys, 6)
    assert "too short" in err and "block" in err


def test_a_validation_split_one_token_short_says_what_each_split_has_and_needs(tmp_path, capsys):
    """It said "169 tokens, but one block needs 17 tokens in each split": the 17-token validation split had 17."""
    (tmp_path / "short.txt").write_text("a" * 169)
    err = fails(["train", "--preset", "tiny", "--data", str(tmp_path / "short.txt")], capsys, 6)
    assert "its 169 tokens split into 152 for training and 17 for validation (fraction 0.1)" in err
    assert "each split needs at least 18\n" in err


def test_unknown_preset_suggests(corpus, capsys):
    err = fails(["train", "--preset", "shakespear-char", "--data", str(corpus)], capsys, 3)
    assert "unknown preset 'shakespear-char' (did you mean 'shakespeare-char'?)" in err


def test_unknown_key_suggests(corpus, capsys):
    err = fails(["train", "--preset", "tiny", "--data", str(corpus), "--set", "optim.lrr=1"], capsys, 3)
    assert "optim -> lrr: unknown key (did you mean 'lr'?)" in err


def test_config_file_unknown_key_names_file(corpus, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("model:\n  n_layers: 2\n")
    err = fails(["train", "--config", str(cfg), "--data", str(corpus)], capsys, 3)
    assert f"{cfg}: model -> n_layers: unknown key (did you mean 'n_layer'?)" in err


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    assert "not a training run" in fails(["train", "--resume", str(tmp_path / "notarun")], capsys, 6)


def test_an_out_whose_name_is_not_utf8_is_refused_before_training(corpus, tmp_path, capsys):
    # It trained, then failed at the tokenizer's save as 'corrupt run\\udcff/tokenizer.json', with a hint to
    # re-download it (found by hand beside fuzz_cli.py's export case).
    out = tmp_path / os.fsdecode(b"run-\xff")
    assert run(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--max-iters", "2"]) == 6
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"error: {tmp_path}/run-\\xff: its name is not UTF-8 (the byte \\xff), and the tokenizers library takes only"
        " UTF-8 paths",
        "hint: give --out a folder whose name is UTF-8",
    ]
    assert not out.exists()


def test_resume_with_an_incompatible_config(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--max-iters", "2"]) == 0
    capsys.readouterr()
    err = fails(["train", "--resume", str(out), "--set", "model.n_layer=2"], capsys, 6)
    assert "model.n_layer" in err
    err = fails(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out)], capsys, 6)
    assert "is a training run" in err and "--resume" in err


def test_disk_full_leaves_no_half_written_checkpoint(corpus, tmp_path, monkeypatch):
    import errno

    import torch

    from gptcli.train import checkpoint, loop
    from gptcli.train.errors import DiskFullError

    out = tmp_path / "run"
    setup = loop.resolve_run(
        data_path=corpus, out=out, resume=None, preset="tiny", config_file=None, sets=[], flags={"train.max_iters": 10}
    )
    loop.train(setup)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    weights = (out / "model.safetensors").read_bytes()

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    setup = loop.resolve_run(
        data_path=None, out=None, resume=out, preset=None, config_file=None, sets=[], flags={"train.max_iters": 20}
    )
    with pytest.raises(DiskFullError) as info:
        loop.train(setup)
    assert "no space left" in str(info.value) and info.value.exit_code == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # no .tmp-* left behind
    assert (out / "model.safetensors").read_bytes() == weights
    assert checkpoint.load_state(out / "checkpoints" / before[-1])["step"] == 10


def test_nan_loss_stops_with_a_clear_error(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--lr", "1e30"]
    err = fails([*argv, "--set", "optim.grad_clip=0", "--set", "optim.warmup_iters=0"], capsys, 1)
    assert "the training loss became" in err


def test_nan_loss_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    from gptcli.train import checkpoint, loop

    out = tmp_path / "run"
    assert run(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--max-iters", "10"]) == 0
    real_step, steps = loop.optimisation_step, []

    def nan_at_the_second_step(*args, **kwargs):  # steps 11 (good) and 12 (NaN) after the resume
        loss = real_step(*args, **kwargs)
        steps.append(1)
        return loss * float("nan") if len(steps) == 2 else loss

    monkeypatch.setattr(loop, "optimisation_step", nan_at_the_second_step)
    capsys.readouterr()
    argv = ["train", "--resume", str(out), "--max-iters", "20", "--set", "checkpoint.interval=1"]
    err = fails(argv, capsys, 1)
    assert "the training loss became nan at step 12; the checkpoints before it are kept" in err
    # the hint said "lower --lr ..., then --resume", which a resume refuses (it keeps the run's optim settings)
    assert "start again with a lower --lr, or --set optim.grad_clip=1.0 (a --resume keeps" in err
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-0000010", "step-0000011"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000010", "step-0000011"]
    run_info = json.loads((out / "run.json").read_text())
    assert (run_info["latest"], run_info["step"]) == ("step-0000011", 11)
    last_good = out / "checkpoints" / "step-0000011"
    assert (out / "model.safetensors").read_bytes() == (last_good / "model.safetensors").read_bytes()
    assert checkpoint.load_state(last_good)["step"] == 11


def test_a_half_precision_dtype_on_the_cpu_is_said_to_be_ignored(corpus, tmp_path, capsys):
    argv = ["train", "--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "run"), "--max-iters", "1"]
    assert run([*argv, "--device", "cpu", "--set", "train.dtype=bfloat16"]) == 0
    assert "train.dtype bfloat16 applies on CUDA only: the CPU trains in float32" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "n_layer: 1" in printed and "params:" in printed and "flops_per_iter:" in printed
    assert not out.exists()
    assert run(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)  # was YAML
    assert plan["config"]["model"]["n_layer"] == 1 and plan["params"] > 0 and plan["flops_per_iter"] > 0
    assert not out.exists()


def test_bpe_and_jsonl(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # generate reads a piped stdin
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": line}) for line in TRAIN_TEXT.splitlines()) + "\n")
    out = tmp_path / "bpe"
    argv = ["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--tokenizer", "bpe"]
    assert run([*argv, "--vocab-size", "300"]) == 0, capsys.readouterr().err
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|endoftext|>"
    assert json.loads((out / "config.json").read_text())["eos_token_id"] is not None
    capsys.readouterr()
    assert run(["generate", "--model", str(out), "--raw", "ROMEO", "--max-tokens", "5"]) == 0, capsys.readouterr().err


def test_fine_tune_with_init(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    out = tmp_path / "ft"
    data = tmp_path / "chats.jsonl"
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
    data.write_text("\n".join(json.dumps(c) for c in chats * 40) + "\n")
    argv = ["--data", str(data), "--out", str(out), "--init", str(tiny_models["llama"]), "--max-iters", "3"]
    assert run(["train", "--preset", "tiny", *argv, "--tokenizer", "char"]) == 2  # was replaced silently
    assert "--tokenizer char cannot go with --init" in capsys.readouterr().err and not out.exists()
    assert run(["train", "--preset", "tiny", *argv]) == 0, capsys.readouterr().err
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    capsys.readouterr()
    assert run(["generate", "--model", str(out), "hi", "--max-tokens", "3"]) == 0


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},  # OpenAI's parts
        {"role": ["user"], "content": "hi"},
        {"role": "user"},
        "hi",
    ],
)
def test_a_chat_line_whose_message_is_not_text_names_the_line_not_the_template(tiny_models, tmp_path, capsys, message):
    """It failed inside the model's chat template: "the chat template fails: TypeError ... hint: fix the template,
    or use --raw" (exit 5), blaming the model for the data."""
    data = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [good["messages"][0], message]}) + "\n")
    argv = ["--data", str(data), "--out", str(tmp_path / "ft"), "--init", str(tiny_models["llama"])]
    assert run(["train", "--preset", "tiny", *argv, "--max-iters", "1"]) == 6
    err = capsys.readouterr().err
    assert f"error: {data}:2: message 2 needs a `role` and a `content` that are text" in err and "template" not in err


def test_an_empty_data_out_or_resume_is_a_usage_error_not_the_current_folder(tmp_path, capsys, monkeypatch):
    """`--data "$DATA"` with DATA unset trained on every text file of the current folder (Path("") is "."), and
    `--out ""` wrote the run there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello world " * 500)
    for argv in (["--data", ""], ["--data", "notes.txt", "--out", ""], ["--resume", ""]):
        assert run(["train", "--preset", "tiny", "--max-iters", "1", *argv]) == 2
        err = capsys.readouterr().err
        assert "an empty path (to mean this folder, give '.')" in err.splitlines()[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # nothing trained, no run written


def test_config_precedence():
    from gptcli.train.config import load_config, parse_set

    cfg = load_config(preset="tiny", sets=["optim.lr=0.5", "eval.iters=3"], flags={"optim.lr": 0.25})
    assert cfg.optim.lr == 0.25 and cfg.eval.iters == 3 and cfg.model.n_layer == 1
    assert parse_set(["a.b=0.5", "c.d=true", "e.f=null"]) == {"a.b": 0.5, "c.d": True, "e.f": None}
    assert load_config(preset="tiny", sets=["optim.lr=3e-4"]).optim.lr == 3e-4  # YAML 1.1 reads 3e-4 as text
    shakespeare = load_config(preset="shakespeare-char")
    m, t = shakespeare.model, shakespeare.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (t.batch_size, t.max_iters, shakespeare.optim.lr_decay_iters) == (12, 2000, 2000)
    assert (shakespeare.optim.lr, shakespeare.optim.min_lr) == (3e-3, 3e-4)


def test_a_learning_rate_alone_brings_its_own_floor(tmp_path):
    """README's fine-tune example: --lr 5e-5 under the default preset (min_lr 3e-4) was a config error."""
    from gptcli.errors import ConfigError
    from gptcli.train.config import load_config

    optim = load_config(preset="shakespeare-char", flags={"optim.lr": 5e-5}).optim
    assert (optim.lr, optim.min_lr) == (5e-5, 5e-6)
    assert load_config(preset="shakespeare-char", sets=["optim.lr=1e-5"]).optim.min_lr == 1e-6
    config = tmp_path / "train.yaml"
    config.write_text("optim: {lr: 1.0e-3, min_lr: 2.0e-4}\n")
    assert load_config(preset="tiny", config_file=config).optim.min_lr == 2e-4  # set beside its lr: kept
    assert load_config(preset="tiny", sets=["optim.min_lr=1e-6"], flags={"optim.lr": 5e-5}).optim.min_lr == 1e-6
    with pytest.raises(ConfigError, match=r"min_lr in \[0, lr\] \(lr 5e-05, min_lr 0.001\)"):
        load_config(preset="tiny", sets=["optim.min_lr=1e-3"], flags={"optim.lr": 5e-5})  # asked for: refused


def test_data_preparation_reports_progress_for_each_long_step(tmp_path):
    from gptcli.train.data import ENCODE_CHUNK, prepare

    data = tmp_path / "docs.jsonl"
    lines = [f"line {i}: {TRAIN_TEXT.splitlines()[i % 5]}" for i in range(ENCODE_CHUNK + 10)]
    data.write_text("\n".join(json.dumps({"text": line}) for line in lines) + "\n")
    calls: list[tuple[str, int, int | None]] = []
    prepare(
        data,
        tokenizer="bpe",
        vocab_size=300,
        val_fraction=0.1,
        block_size=8,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert stages == ["reading", "cleaning", "training a 300-token BPE", "tokenizing"]
    n = len(lines)
    assert calls[n - 1] == ("reading", n, None) and ("cleaning", n, n) in calls
    tokenizing = [done for stage, done, _ in calls if stage == "tokenizing"]
    assert tokenizing == [0, ENCODE_CHUNK, n]  # said as it starts, then chunked, so a big corpus moves the bar


def test_an_init_gguf_is_converted_with_its_steps_shown_as_data_progress(tiny_gguf, corpus, tmp_path):
    """`train --init model.gguf` converted it first (25-70 s for the default model) with no progress at all."""
    from gptcli.train import events as ev
    from gptcli.train import loop

    seen: list = []
    flags = {"init": str(tiny_gguf), "train.max_iters": 1}
    loop.resolve_run(
        data_path=corpus,
        out=tmp_path / "run",
        resume=None,
        preset="tiny",
        config_file=None,
        sets=[],
        flags=flags,
        on_event=seen.append,
    )
    steps = [(e.done, e.total) for e in seen if isinstance(e, ev.DataProgress) and e.stage == "converting tiny.gguf"]
    assert steps == [(done, 5) for done in range(6)]


def test_training_yields_typed_events_in_order(corpus, tmp_path):
    from gptcli.train import events as ev
    from gptcli.train import loop

    setup = loop.resolve_run(
        data_path=corpus,
        out=tmp_path / "run",
        resume=None,
        preset="tiny",
        config_file=None,
        sets=["eval.interval=2", "checkpoint.interval=3"],
        flags={"train.max_iters": 3},
    )
    seen = list(loop.training(setup))
    assert [type(e) for e in seen] == [
        ev.Started,
        ev.Step,
        ev.Step,
        ev.Evaluated,
        ev.Step,
        ev.Evaluated,
        ev.Checkpointed,
        ev.Finished,
    ]
    started, finished = seen[0], seen[-1]
    assert (started.start_step, started.max_iters, started.device) == (0, 3, "cpu")
    assert [e.step for e in seen if isinstance(e, ev.Step)] == [1, 2, 3]
    assert finished.steps == 3 and finished.interrupted is False and finished.best_step in (2, 3)
    summary = finished.as_dict()
    assert summary["params"] == started.info.params and summary["steps"] == 3
    # Stopped before the first evaluation: the val loss is null in the JSON summary (it was NaN: not JSON).
    from dataclasses import replace

    early = replace(finished, val_loss=math.nan, best_val_loss=None).as_dict()
    assert early["val_loss"] is None and json.loads(json.dumps(early, allow_nan=False))["val_loss"] is None
    assert [r["step"] for r in records(tmp_path / "run") if "loss" in r] == [1, 2, 3]


def test_ctrl_c_while_the_model_is_built_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    """QA: a signal after the data was ready and before the first step (the model being built, the loop not yet
    holding the signals) exited 130/143 without a word about what was kept."""
    from gptcli.cli.app import run
    from gptcli.train import loop

    def interrupted(setup, on_event):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 200)
    out = tmp_path / "run"
    code = run(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130, err
    assert "interrupted before the first step (the model being built): nothing was saved" in err


def test_a_fine_tune_whose_init_was_a_relative_folder_resumes_from_anywhere(tiny_models, tmp_path, capsys, monkeypatch):
    """QA: `--init runs/base` was recorded as typed, and looked up again on every resume: from another folder, or
    once the init folder moved, the resume failed (exit 5, "cannot fetch 'runs/base' from the hub"). A local init
    is now recorded whole; one not found on a resume is stood for by the checkpoint, which holds what is read."""
    import shutil

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    shutil.copytree(tiny_models["llama"], tmp_path / "runs" / "base")
    data = tmp_path / "chats.jsonl"
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
    data.write_text("\n".join(json.dumps(c) for c in chats * 40) + "\n")
    monkeypatch.chdir(tmp_path)
    argv = ["--preset", "tiny", "--data", str(data), "--set", "checkpoint.interval=2"]
    assert run(["train", *argv, "--init", "runs/base", "--max-iters", "2", "--out", "runs/ft"]) == 0
    assert f"init: {tmp_path / 'runs' / 'base'}" in (tmp_path / "runs" / "ft" / "train_config.yaml").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert run(["train", "--resume", str(tmp_path / "runs" / "ft"), "--max-iters", "4"]) == 0, capsys.readouterr().err
    (tmp_path / "runs" / "base").rename(tmp_path / "moved")  # the init folder moved since
    assert run(["train", "--resume", str(tmp_path / "runs" / "ft"), "--max-iters", "6"]) == 0, capsys.readouterr().err
    assert "its checkpoint stands for it" in capsys.readouterr().err
    assert json.loads((tmp_path / "runs" / "ft" / "run.json").read_text())["step"] == 6


def test_an_init_runs_config_shows_the_init_models_shape_and_the_block_it_trains_at(
    tiny_models, corpus, tmp_path, capsys
):
    """QA: `--dry-run` and `runs show` printed the preset's model section for an --init run (1 layer, 32 wide under
    `tiny`) where the model is the init's, and a block_size past the init's context was capped without a word."""
    out = tmp_path / "ft"
    argv = ["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--init", str(tiny_models["llama"])]
    assert run([*argv, "--set", "model.block_size=4096", "--dry-run", "--json"]) == 0
    captured = capsys.readouterr()
    assert f"note: model.block_size 4096 is past {tiny_models['llama']}'s context: training at 128" in captured.err
    model = json.loads(captured.out)["config"]["model"]
    assert (model["n_layer"], model["n_head"], model["n_embd"], model["block_size"]) == (2, 4, 64, 128)
    assert run([*argv, "--set", "model.block_size=32", "--max-iters", "1"]) == 0
    capsys.readouterr()
    assert run(["runs", "show", str(out), "--json"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["model"]["n_layer"], config["model"]["n_embd"], config["model"]["block_size"]) == (2, 64, 32)
    assert config["data"]["vocab_size"] == json.loads((tiny_models["llama"] / "config.json").read_text())["vocab_size"]
