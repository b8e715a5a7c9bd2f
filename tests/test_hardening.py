"""Corrupt models, broken environments and small misuses: each a one-line `error:` with its exit code.

Every case runs the real program in a subprocess and checks the exact first error line, the exit code,
and that no traceback leaks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli

CORPUS_TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east.\n" * 200


def first_error(result: subprocess.CompletedProcess) -> str:
    """The first `error:` line of stderr, after checking that no traceback leaked."""
    err = result.stderr.decode()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors, err
    return errors[0]


def model_copy(tiny_models, family: str, tmp_path: Path, name: str = "model") -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_models[family], folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


# ------------------------------------------------------------------ corrupt or hostile model folders

CORRUPT_CONFIGS = [
    ("gpt2", {"n_layer": -1}, "n_layer = -1 is impossible (must be a positive integer, at most 16,777,216)"),
    ("gpt2", {"n_embd": 1e9}, "n_embd = 1000000000.0 is impossible (must be a positive integer, at most 16,777,216)"),
    ("gpt2", {"vocab_size": 0}, "vocab_size = 0 is impossible (must be a positive integer, at most 16,777,216)"),
    (
        "gpt2",
        {"n_positions": 10**12},
        "n_positions = 1000000000000 is impossible (must be a positive integer, at most 16,777,216)",
    ),
    (
        "gpt2",
        {"n_positions": 100},
        "n_positions disagrees with {folder}/model.safetensors: tensor transformer.wpe.weight has shape [96, 64], "
        "the config implies [100, 64]",
    ),
    (
        "llama",
        {"hidden_size": 128},
        "hidden_size disagrees with {folder}/model.safetensors: tensor model.embed_tokens.weight has shape "
        "[400, 64], the config implies [400, 128]",
    ),
    (
        "llama",
        {"max_position_embeddings": 10**12},
        "max_position_embeddings = 1000000000000 is impossible (must be a positive integer, at most 16,777,216)",
    ),
]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize(("family", "changes", "message"), CORRUPT_CONFIGS)
def test_an_impossible_config_is_a_model_error_naming_the_file(
    tiny_models, tmp_path, backend, family, changes, message
):
    folder = model_copy(tiny_models, family, tmp_path)
    edit_config(folder, **changes)
    result = run_cli("generate", "-m", str(folder), "--backend", backend, "-n", "2", "hello")
    assert first_error(result) == f"error: {folder}/config.json: " + message.format(folder=folder)
    assert result.returncode == 5
    assert not (Path(os.environ["GPTCLI_HOME"]) / "cache" / "onnx").exists()  # refused before any export


def test_an_invalid_tokenizer_json_names_the_file(tiny_models, tmp_path):
    folder = model_copy(tiny_models, "llama", tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')
    for backend in ("torch", "onnx"):
        result = run_cli("generate", "-m", str(folder), "--backend", backend, "-n", "2", "hello")
        assert first_error(result).startswith(f"error: corrupt {folder}/tokenizer.json: "), backend
        assert result.returncode == 5


def test_an_invalid_tokenizer_config_names_the_file(tiny_models, tmp_path):
    folder = model_copy(tiny_models, "llama", tmp_path)
    (folder / "tokenizer_config.json").write_text('{"eos_token": ')
    result = run_cli("generate", "-m", str(folder), "-n", "2", "hello")
    assert (
        first_error(result)
        == f"error: corrupt {folder}/tokenizer_config.json: Expecting value: line 1 column 15 (char 14)"
    )
    assert result.returncode == 5


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{{ messages.__class__.__mro__ }}",
            "SecurityError: access to attribute '__class__' of 'list' object is unsafe.",
        ),
        ("{{ messages.append(1) }}", "SecurityError: access to attribute 'append' of 'list' object is unsafe."),
        (
            "{% for m in messages %}{{ m.content ",
            "TemplateSyntaxError: unexpected end of template, expected 'end of print statement'.",
        ),
        ("{{ nothing.here }}", "UndefinedError: 'nothing' is undefined"),
    ],
)
def test_a_chat_template_that_fails_names_the_file(tiny_models, tmp_path, template, message):
    folder = model_copy(tiny_models, "llama", tmp_path)
    (folder / "chat_template.jinja").write_text(template)
    result = run_cli("generate", "-m", str(folder), "-n", "2", "hello")
    assert first_error(result) == f"error: {folder}/chat_template.jinja: the chat template fails: {message}"
    assert result.returncode == 5


# ------------------------------------------------------------------ broken environments


def _without_file_permission_bypass() -> list[str]:
    """A command prefix under which file permissions hold: as root, drop the capabilities that bypass them."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def run_restricted(*args: str, input: bytes = b"") -> subprocess.CompletedProcess:
    command = [*_without_file_permission_bypass(), sys.executable, "-m", "gptcli", *args]
    return subprocess.run(command, input=input, capture_output=True, cwd=REPO, timeout=180)


def make_read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~0o222)


def test_a_read_only_home_runs_cached_models_and_names_itself_when_a_write_is_needed(tiny_models, isolated_home):
    llama, gpt2 = tiny_models["llama"], tiny_models["gpt2"]
    assert (
        run_cli("generate", "-m", str(llama), "--backend", "onnx", "-n", "2", "hi").returncode == 0
    )  # fills the cache
    make_read_only(isolated_home)
    try:
        for backend in ("torch", "onnx"):  # already converted: no write needed
            result = run_restricted("generate", "-m", str(llama), "--backend", backend, "-n", "2", "hi")
            assert result.returncode == 0, result.stderr.decode()
        result = run_restricted("generate", "-m", str(gpt2), "--backend", "onnx", "-n", "2", "hi")
        said = first_error(result)  # the export's folder, and where it could not be made
        assert said.startswith(f"error: cannot write {isolated_home}/cache/onnx/tiny-gpt2-fp32-cpu-"), said
        assert said.endswith(f": cannot create a folder in {isolated_home}/cache/onnx (Permission denied)"), said
        assert result.returncode == 1
        result = run_restricted("chat", "-m", str(llama), "-n", "2", input=b"hello\n")
        assert first_error(result) == f"error: cannot write {isolated_home}/data: Permission denied"
        assert result.returncode == 1
    finally:
        for path in [isolated_home, *isolated_home.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_a_home_that_cannot_be_a_folder_is_named(tiny_models, tmp_path):
    (tmp_path / "a-file").write_text("")
    home = tmp_path / "a-file" / "home"
    result = run_cli("generate", "-m", str(tiny_models["llama"]), "--backend", "onnx", "-n", "2", "hi",
                     env={"GPTCLI_HOME": str(home)})  # fmt: skip
    assert (
        first_error(result)
        == f"error: cannot write {home}/cache/onnx: {tmp_path / 'a-file'} is a file, where a folder should be"
    )
    assert result.returncode == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_stdout_on_a_full_device_is_named(tiny_models, extra):
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [sys.executable, "-m", "gptcli", "generate", "-m", str(tiny_models["llama"]), "-n", "5", *extra, "hi"],
            stdout=full, stderr=subprocess.PIPE, cwd=REPO, timeout=120,
        )  # fmt: skip
    assert first_error(result) == "error: cannot write to stdout (/dev/full): No space left on device"
    assert result.returncode == 1
    assert result.stderr.decode().count("\n") <= 2  # the error (and no "Exception ignored" at exit)


@pytest.mark.parametrize("args", [["generate", "-n", "20", "Once upon"], ["--help"], ["models", "list"]])
def test_a_closed_pipe_ends_quietly_with_exit_0(tiny_models, args):
    if args[0] == "generate":
        args = [args[0], "-m", str(tiny_models["llama"]), *args[1:]]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: every write fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gptcli", *args], stdout=write_end, stderr=subprocess.PIPE, cwd=REPO, timeout=120
        )
    finally:
        os.close(write_end)
    assert result.stderr.decode() == ""
    assert result.returncode == 0


TORCH_SAVE_ON_A_FULL_DISK = """
import sys
import torch

def full_disk(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                       "data/0: file write failed; unexpected pos 1024 vs 512")

torch.save = full_disk
from gptcli.cli.app import main
sys.argv = ["gptcli", *sys.argv[1:]]
main()
"""


def test_a_full_disk_while_training_names_the_checkpoint(tmp_path):
    corpus, out = tmp_path / "corpus.txt", tmp_path / "run"
    corpus.write_text(CORPUS_TEXT)
    result = subprocess.run(
        [sys.executable, "-c", TORCH_SAVE_ON_A_FULL_DISK, "train", "--preset", "tiny", "--data", str(corpus),
         "--out", str(out), "--max-iters", "10"],
        capture_output=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert first_error(result) == (
        f"error: no space left on device while writing checkpoint {out}/checkpoints/step-0000010; "
        "no checkpoint was saved yet"  # the first one: there are no previous checkpoints, nothing to --resume
    )
    assert result.returncode == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == []  # no half-written checkpoint


def test_a_second_train_on_one_run_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    corpus, out = tmp_path / "corpus.txt", tmp_path / "run"
    corpus.write_text(CORPUS_TEXT)
    lock = out / ".gptcli-train.lock"
    first = subprocess.Popen(
        [sys.executable, "-m", "gptcli", "train", "--preset", "tiny", "--data", str(corpus), "--out", str(out),
         "--max-iters", "100000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip()) and time.monotonic() < deadline:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.2)
        for args in (["--preset", "tiny", "--data", str(corpus), "--out", str(out)], ["--resume", str(out)]):
            result = run_cli("train", *args)
            assert first_error(result) == f"error: {out} is being trained by another gptcli process (pid {first.pid})"
            assert result.returncode == 6
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".gptcli-train.lock").write_text(f"{first.pid}\n")  # its process is dead: the lock is free
    result = run_cli("train", "--preset", "tiny", "--data", str(corpus), "--out", str(stale), "--max-iters", "2")
    assert result.returncode == 0, result.stderr.decode()
    assert not (stale / ".gptcli-train.lock").exists()


# ------------------------------------------------------------------ smaller ones


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--seed", "-1", "error: --seed: sampling.seed must be in [0, 2**63), got -1"),
        ("--seed", str(2**63), f"error: --seed: sampling.seed must be in [0, 2**63), got {2**63}"),
        ("--temperature", "inf", "error: --temperature: sampling.temperature must be a finite number, got inf"),
        ("--top-p", "nan", "error: --top-p: sampling.top_p must be a finite number, got nan"),
        # Before the bound, 100000 spent minutes and 16 GB creating threads before the first token.
        ("--threads", "100000", "error: --threads: threads must be in 1..1024, got 100000"),
    ],
)
def test_out_of_range_numbers_are_config_errors(tiny_models, flag, value, message):
    result = run_cli("generate", "-m", str(tiny_models["llama"]), "-n", "2", f"{flag}={value}", "hi")
    assert first_error(result) == message
    assert result.returncode == 3


def test_more_threads_than_cpus_warn_and_bench_bounds_its_thread_list(tiny_models):
    from gptcli.hardware import usable_cpus

    more = usable_cpus() + 1
    result = run_cli("generate", "-m", str(tiny_models["llama"]), "-n", "2", "--threads", str(more), "hi")
    assert result.returncode == 0
    assert f"warning: --threads {more} is more than the {usable_cpus()} CPUs here" in result.stderr.decode()
    result = run_cli("bench", "-m", str(tiny_models["llama"]), "--threads", "0")
    assert first_error(result) == "error: --threads: 0 is below 1" and "e.g. --threads 1,2" in result.stderr.decode()
    result = run_cli("bench", "-m", str(tiny_models["llama"]), "--threads", "2,5000")
    assert first_error(result) == "error: --threads: 5000 is above 1024" and result.returncode == 2


@pytest.mark.parametrize(("args", "env"), [(["--allow-pickle"], {}), ([], {"GPTCLI_ALLOW_PICKLE": "1"})])
def test_allowing_pickle_warns_every_time(tiny_models, args, env):
    from gptcli.models import PICKLE_WARNING

    for _ in range(2):
        result = run_cli("generate", "-m", str(tiny_models["llama"]), "-n", "2", *args, "hi", env=env)
        assert result.returncode == 0
        assert result.stderr.decode().splitlines()[0] == PICKLE_WARNING
    quiet = run_cli("generate", "-m", str(tiny_models["llama"]), "-n", "2", "hi")
    assert "pickle" not in quiet.stderr.decode()


def test_runs_show_indents_the_config_yaml(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": {"n_layer": 1, "n_head": 2}, "train": {"seed": 7, "max_iters": 20}}
    (run / "run.json").write_text(json.dumps({"latest": "step-0000020", "step": 20, "data": "corpus.txt"}))
    (run / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_cli("runs", "show", str(run))
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "step: 20\n" in out
    assert yaml.safe_load(out[out.index("config:") :]) == {"config": config}


def test_readme_points_only_inside_the_checkout():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.findall(r"\.\./[\w./-]+", readme) == []
    for target in re.findall(r"\]\(([^)#\s]+)\)", readme):
        if not re.match(r"[a-z]+:", target):
            assert (REPO / target).exists(), target


def test_train_whose_output_reader_went_away_keeps_its_steps_with_a_checkpoint(tmp_path):
    """QA: `gptcli train ... 2>&1 | head -n 4` ended at head's exit with exit 0 and no word, the steps since the
    last checkpoint lost (run.json at step 700 after 750 steps). The run now goes on quietly to the step's end,
    saves a checkpoint there and exits 0, as a closed pipe does everywhere."""
    corpus, out = tmp_path / "corpus.txt", tmp_path / "run"
    corpus.write_text(CORPUS_TEXT)
    process = subprocess.Popen(
        [sys.executable, "-m", "gptcli", "train", "--preset", "tiny", "--data", str(corpus), "--out", str(out),
         "--max-iters", "100000", "--set", "eval.interval=5", "--set", "checkpoint.interval=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    assert process.stdout is not None
    lines = [process.stdout.readline() for _ in range(4)]  # `| head -n 4`
    assert any(line.startswith(b"step 5:") for line in lines), lines
    process.stdout.close()
    assert process.wait(timeout=120) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["step"] >= 5 and info["latest"] == f"step-{info['step']:07d}"  # saved where it stopped
