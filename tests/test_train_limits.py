"""`gptcli train` at its limits: memory it cannot have, numbers out of range, damaged run folders, a start
that failed, and flags a resume cannot honour. Each is a one-line error with its exit code, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from gptcli.cli.app import run
from tests.test_train import records


def fails(argv: list[str], capsys, code: int) -> str:
    """Run in-process; the exit code, exactly one `error:` line, no traceback; returns stderr."""
    assert run(argv) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return err


def train(corpus: Path, out: Path, *args: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), *args]


# ------------------------------------------------------------------ memory


def test_a_run_over_the_available_memory_is_refused_before_anything_is_built(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("gptcli.hardware.available_memory_bytes", lambda: 1_000_000)
    out = tmp_path / "run"
    err = fails(train(corpus, out, "--device", "cpu", "--batch-size", "256"), capsys, 3)
    assert "training needs about" in err and "more than the 976.6 KiB available on cpu" in err
    assert "hint: lower train.batch_size" in err  # the activations are most of it
    assert not out.exists()
    err = fails(train(corpus, out, "--device", "cpu", "--set", "model.n_embd=256"), capsys, 3)
    assert "parameters" in err and "hint: lower model.n_layer or model.n_embd" in err  # the weights are most of it
    assert not out.exists()


def test_a_dry_run_of_a_model_too_big_allocates_nothing(corpus, tmp_path, capsys):
    # 1024 layers 65536 wide: 53 trillion parameters. The old dry run built it ("can't allocate memory").
    sets = ["--set", "model.n_layer=1024", "--set", "model.n_embd=65536", "--set", "model.n_head=1"]
    err = fails([*train(corpus, tmp_path / "run", "--device", "cpu", "--dry-run"), *sets], capsys, 3)
    assert "training needs about" in err and "52,777,431,728,128 parameters" in err  # the parameter count, computed
    assert not (tmp_path / "run").exists()


def test_a_dry_run_counts_the_parameters_without_building_the_model(corpus, tmp_path, capsys):
    from gptcli.train import loop
    from gptcli.train.setup import build_model, describe

    sets = ["model.n_layer=2", "model.n_embd=48"]
    assert run([*train(corpus, tmp_path / "run", "--dry-run"), "--set", sets[0], "--set", sets[1]]) == 0
    printed = capsys.readouterr().out
    assert "memory_estimate_bytes:" in printed and not (tmp_path / "run").exists()
    setup = loop.resolve_run(
        data_path=corpus, out=tmp_path / "run", resume=None, preset="tiny", config_file=None, sets=sets, flags={}
    )
    model = build_model(setup)
    assert describe(setup) == describe(setup, model)  # the shape's count and FLOPs are the model's
    assert f"params: {sum(p.numel() for p in model.parameters()):,}\n" in printed


def test_a_fine_tune_is_sized_from_the_model_files(tiny_models):
    from gptcli.train.setup import folder_shape
    from gptcli.train.step import load_causal_lm

    for name in ("gpt2", "llama"):
        shape = folder_shape(tiny_models[name])
        model = load_causal_lm(tiny_models[name])
        assert shape.params == sum(p.numel() for p in model.parameters())
        assert (shape.layers, shape.width) == (model.config.num_hidden_layers, model.config.hidden_size)


# ------------------------------------------------------------------ numbers out of range


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--batch-size", "99999999999999999999999"], "train.batch_size"),
        (["--tokenizer", "bpe", "--vocab-size", "99999999999999999999999"], "data.vocab_size"),
        (["--set", "optim.beta1=2"], "optim.beta1"),
        (["--set", "optim.beta2=-1"], "optim.beta2"),
        (["--set", "model.block_size=1000000000000000000000000000000"], "model.block_size"),
        (["--set", "model.n_embd=1000000000000000000000000000000"], "model.n_embd"),
    ],
)
def test_a_number_out_of_range_is_a_config_error(corpus, tmp_path, capsys, args, named):
    err = fails(train(corpus, tmp_path / "run", *args), capsys, 3)
    assert named in err and len(err.splitlines()[-1]) < 160  # one short line, not a C++ stack dump
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "setting",
    [
        "train.batch_size=65537",
        "train.grad_accum=65537",
        "model.block_size=1048577",
        "model.n_layer=1025",
        "model.n_embd=65538",  # a multiple of the tiny preset's 2 heads
        "model.n_head=1025,model.n_embd=2050",
        "data.vocab_size=2097153",
        "optim.beta1=1",
        "optim.beta2=1.5",
        "optim.beta1=-0.1",
        "train.max_iters=1000000000001",
        "optim.lr_decay_iters=1000000000001",
        "eval.iters=100001",  # every evaluation would run them all
        "eval.interval=0",
        "checkpoint.interval=1000000000001",
    ],
)
def test_validate_has_upper_bounds(setting):
    from gptcli.errors import ConfigError
    from gptcli.train.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(preset="tiny", sets=setting.split(","))
    assert setting.split("=")[0] in info.value.message


# ------------------------------------------------------------------ damaged run folders


def fake_run(folder: Path, corpus: Path) -> Path:
    """The two files that make a folder a run (no checkpoint: these errors come first)."""
    from gptcli.train.config import load_config

    folder.mkdir()
    (folder / "train_config.yaml").write_text(yaml.safe_dump(load_config(preset="tiny").to_dict()))
    (folder / "run.json").write_text(json.dumps({"data": str(corpus)}))
    return folder


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("run.json", "[1, 2]", "run.json (not a JSON object)"),
        ("run.json", '{"data": 5}', 'run.json ("data" is not a path)'),
        ("run.json", "[" * 100_000 + "]" * 100_000, "run.json (not valid JSON (nested too deeply))"),
        ("train_config.yaml", "model: [\n", "train_config.yaml:2:1: invalid YAML"),
        ("train_config.yaml", "- 1\n- 2\n", "train_config.yaml"),
    ],
)
def test_a_damaged_run_file_is_a_one_line_error(corpus, tmp_path, capsys, name, content, said):
    folder = fake_run(tmp_path / "run", corpus)
    (folder / name).write_text(content)
    err = fails(["train", "--resume", str(folder), "--max-iters", "20"], capsys, 6)
    assert said in err and "cannot resume" in err


def test_runs_show_and_list_read_a_damaged_run_file_without_a_traceback(corpus, tmp_path, capsys):
    nested = fake_run(tmp_path / "nested", corpus)
    (nested / "run.json").write_text("{" + '"a": {' * 50_000 + "}" * 50_001)  # the JSON parser's recursion limit
    odd = fake_run(tmp_path / "odd", corpus)
    (odd / "run.json").write_text(json.dumps({"data": [1, 2], "step": {"a": 1}, "created": None}))
    assert "nested/run.json: cannot read it: not valid JSON (nested too deeply)" in fails(
        ["runs", "show", str(nested)], capsys, 6
    )
    assert run(["runs", "show", str(odd)]) == 0  # a list where a path belongs is shown, not joined
    assert "data: [1, 2]" in capsys.readouterr().out
    assert run(["runs", "list", str(tmp_path), "--json"]) == 0  # the damaged run is skipped, not fatal
    captured = capsys.readouterr()
    assert [row["run"] for row in json.loads(captured.out)] == [str(odd)]
    assert "skipped" in captured.err and "Traceback" not in captured.err


def test_runs_json_is_json_when_a_loss_is_not_a_number(corpus, tmp_path, capsys):
    folder = fake_run(tmp_path / "run", corpus)
    (folder / "run.json").write_text('{"data": "x", "step": 3, "best_val_loss": Infinity}')
    (folder / "metrics.jsonl").write_text('{"step": 3, "loss": 2.0}\n{"step": 3, "val_loss": NaN, "val_ppl": NaN}\n')
    for argv in (["runs", "list", str(tmp_path), "--json"], ["runs", "show", str(folder), "--json"]):
        assert run(argv) == 0
        printed = capsys.readouterr().out
        assert "NaN" not in printed and "Infinity" not in printed, printed
        summary = json.loads(printed)
        summary = summary[0] if isinstance(summary, list) else summary
        assert (summary["train_loss"], summary["val_loss"], summary["best_val_loss"]) == (2.0, None, None)


def test_a_checkpoint_whose_model_does_not_load_is_a_one_line_error(corpus, tmp_path, capsys):
    done = tmp_path / "done"
    assert run(train(corpus, done, "--max-iters", "10")) == 0  # one checkpoint: step-0000010
    damages = {
        "garbage weights": ("model.safetensors", b"garbage"),
        "no weights": ("model.safetensors", None),
        "empty config": ("config.json", b"{}"),
    }
    for what, (name, content) in damages.items():
        folder = tmp_path / what.replace(" ", "-")
        shutil.copytree(done, folder)
        damaged = folder / "checkpoints" / "step-0000010" / name
        damaged.unlink()
        if content is not None:
            damaged.write_bytes(content)
        capsys.readouterr()
        err = fails(["train", "--resume", str(folder), "--max-iters", "12"], capsys, 6)
        assert name in err, what


def test_a_model_whose_tokenizer_outgrows_its_embeddings_is_a_model_error(corpus, tmp_path, capsys):
    # A token added to the tokenizer without resizing the embeddings: torch's IndexError at the first step.
    made = tmp_path / "made"
    assert run(train(corpus, made, "--max-iters", "1")) == 0, capsys.readouterr().err
    model = tmp_path / "grown"
    shutil.copytree(made, model, ignore=shutil.ignore_patterns("checkpoints"))
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    extra = {"content": "<|x|>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    tokenizer["added_tokens"].append({"id": 10_000, **extra, "special": True})
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    data = tmp_path / "data.txt"
    data.write_text(corpus.read_text().replace("\n", "<|x|>\n"))  # in every block the steps draw
    capsys.readouterr()
    err = fails(train(data, tmp_path / "run", "--init", str(model), "--max-iters", "2"), capsys, 5)
    assert "gives token id" in err and "past the model's" in err and "resize_token_embeddings" in err
    assert not (tmp_path / "run" / "config.json").exists()


# ------------------------------------------------------------------ a failed start


def test_a_failed_start_leaves_a_folder_a_new_start_reuses(corpus, tmp_path, capsys):
    out = tmp_path / "b"
    diverged = fails(train(corpus, out, "--lr", "1e300"), capsys, 1)
    assert "no checkpoint was saved yet" in diverged and "--resume" not in diverged
    assert (out / "tokenizer.json").is_file() and (out / "train_config.yaml").is_file()
    assert not (out / "run.json").exists()
    assert "not a training run" in fails(["train", "--resume", str(out)], capsys, 6)
    assert run(train(corpus, out, "--max-iters", "3")) == 0, capsys.readouterr().err
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3]  # the failed start's lines are gone
    assert json.loads((out / "run.json").read_text())["step"] == 3


def test_a_folder_with_other_files_is_refused_without_suggesting_resume(corpus, tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    err = fails(train(corpus, out), capsys, 6)
    assert "is not empty" in err and "notes.txt" in err and "--resume" not in err
    assert (out / "notes.txt").read_text() == "mine" and (out / "tokenizer.json").read_text() == "{}"


# ------------------------------------------------------------------ flags a resume cannot honour


def test_a_run_trained_by_another_process_while_the_data_was_prepared_is_not_overwritten(corpus, tmp_path):
    # The lock is taken to train: two starts into one folder both pass the checks while they prepare their data.
    # The later one used to train over the first's finished run (its checkpoint kept, run.json and metrics mixed).
    from gptcli.train import loop
    from gptcli.train.errors import RunError

    out = tmp_path / "run"

    def resolve(data: Path | None, resume: Path | None, iters: int) -> loop.RunSetup:
        return loop.resolve_run(
            data_path=data,
            out=None if resume else out,
            resume=resume,
            preset=None if resume else "tiny",
            config_file=None,
            sets=[],
            flags={"train.max_iters": iters, "train.device": "cpu"},
        )

    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    late, first = resolve(other, None, 2), resolve(corpus, None, 2)
    loop.train(first)
    with pytest.raises(RunError, match="became a training run while this one prepared its data"):
        loop.train(late)
    assert json.loads((out / "run.json").read_text())["data"] == str(corpus.resolve())
    late, first = resolve(None, out, 4), resolve(None, out, 3)  # two resumes of the same run
    loop.train(first)
    with pytest.raises(RunError, match="was trained further while this one prepared its data"):
        loop.train(late)
    assert json.loads((out / "run.json").read_text())["step"] == 3


def test_resume_refuses_max_iters_it_has_passed_and_another_out(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train(corpus, out, "--max-iters", "10")) == 0
    capsys.readouterr()
    for more in (["--max-iters", "10"], ["--max-iters", "5"], []):  # none: the saved 10
        err = fails(["train", "--resume", str(out), *more], capsys, 3)
        assert "already at step 10" in err and "--max-iters" in err
    elsewhere = tmp_path / "elsewhere"
    err = fails(["train", "--resume", str(out), "--max-iters", "12", "--out", str(elsewhere)], capsys, 2)
    assert "--out" in err and "--resume" in err and not elsewhere.exists()
    assert run(["train", "--resume", str(out), "--max-iters", "12", "--out", str(out)]) == 0  # the same folder
    assert json.loads((out / "run.json").read_text())["step"] == 12


def test_resume_after_the_data_moved_says_so_and_takes_its_new_place(corpus, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(corpus.read_text())
    out = tmp_path / "run"
    assert run(train(data, out, "--max-iters", "2")) == 0
    capsys.readouterr()
    moved = data.rename(tmp_path / "moved.txt")
    err = fails(["train", "--resume", str(out), "--max-iters", "4"], capsys, 6)  # said "check --data", not given
    assert f"its data {data} is gone" in err and "pass --data" in err
    assert run(["train", "--resume", str(out), "--max-iters", "4", "--data", str(moved)]) == 0


def test_data_that_is_a_pipe_or_a_link_to_nowhere_says_so(tmp_path, capsys):
    import os

    fifo, loop = tmp_path / "data.fifo", tmp_path / "loop.txt"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    err = fails(train(fifo, tmp_path / "a"), capsys, 6)  # it was "has no text files": treated as a folder
    assert f"error: {fifo} is neither a file nor a folder" in err and "save the data to a file first" in err
    err = fails(train(loop, tmp_path / "b"), capsys, 6)
    assert f"error: a symbolic link that leads nowhere: {loop}" in err


def test_a_data_folder_that_holds_the_runs_is_read_without_them(corpus, tmp_path, capsys):
    # `gptcli train --data .` puts its run in ./runs: a resume then read runs/x/metrics.jsonl as a corpus file
    # ("expected a `text` string"), and a new start would have trained on the run's json files too.
    from gptcli.train.data import corpus_files

    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(corpus, folder / "corpus.txt")
    out = folder / "runs" / "first"
    assert run(train(folder, out, "--max-iters", "2")) == 0, capsys.readouterr().err
    assert corpus_files(folder) == [folder / "corpus.txt"]
    assert run(["train", "--resume", str(out), "--max-iters", "3"]) == 0, capsys.readouterr().err


def test_every_file_of_a_run_gets_the_usual_mode(corpus, tmp_path, capsys):
    from gptcli.atomicio import default_mode

    out = tmp_path / "run"
    assert run(train(corpus, out, "--max-iters", "2", "--set", "checkpoint.interval=1")) == 0, capsys.readouterr()
    files = [p for p in [*out.iterdir(), *(out / "checkpoints").glob("*/*")] if p.is_file()]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(default_mode())}, modes  # model.safetensors came out 0o600


def test_a_full_disk_while_the_data_is_cached_names_the_cache(corpus, tmp_path, capsys, monkeypatch):
    # The spill and token files are written through open files: Python's ENOSPC names no file, and the error
    # was "a write failed: No space left on device" (the cache may be on another disk than the run).
    import errno

    from gptcli.train.data import CleanCorpus

    def full(self, doc):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CleanCorpus, "add", full)
    err = fails(train(corpus, tmp_path / "run"), capsys, 1)
    assert "cannot write" in err and f"{os.sep}train-data: No space left on device" in err, err
    assert "hint: free some space, or set GPTCLI_HOME" in err
