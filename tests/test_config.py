import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptcli.config import FIELDS, coerce, resolve
from gptcli.errors import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_have_default_sources(tmp_path):
    resolved = resolve(user_file=tmp_path / "missing.yaml", environ={})
    assert resolved.settings.model == "smollm2-135m-instruct"
    assert resolved.sources["sampling.temperature"] == "default"


def test_precedence_default_user_file_env_flag(tmp_path):
    user = write(tmp_path, "user.yaml", "sampling:\n  temperature: 0.1\n  top_p: 0.5\n  max_tokens: 10\nmodel: a\n")
    extra = write(tmp_path, "extra.yaml", "sampling:\n  top_p: 0.6\n  max_tokens: 11\n")
    env = {"GPTCLI_MAX_TOKENS": "12", "GPTCLI_MODEL": "b"}
    resolved = resolve(config_file=extra, flags={"model": "c"}, environ=env, user_file=user)
    s = resolved.settings
    assert s.sampling.temperature == 0.1 and resolved.sources["sampling.temperature"] == str(user)
    assert s.sampling.top_p == 0.6 and resolved.sources["sampling.top_p"] == str(extra)
    assert s.sampling.max_tokens == 12 and resolved.sources["sampling.max_tokens"] == "$GPTCLI_MAX_TOKENS"
    assert s.model == "c" and resolved.sources["model"] == "flag"


def test_unknown_key_names_file_path_and_suggestion(tmp_path):
    bad = write(tmp_path, "bad.yaml", "sampling:\n  temprature: 0.3\n")
    with pytest.raises(ConfigError) as info:
        resolve(config_file=bad, environ={}, user_file=tmp_path / "none.yaml")
    assert str(info.value) == f"{bad}: sampling -> temprature: unknown key (did you mean 'temperature'?)"
    assert info.value.exit_code == 3


def test_sampling_key_at_top_level_points_at_section(tmp_path):
    bad = write(tmp_path, "bad.yaml", "temperature: 0.3\n")
    with pytest.raises(ConfigError, match=r"temperature: unknown key \(did you mean 'sampling -> temperature'\?\)"):
        resolve(config_file=bad, environ={}, user_file=tmp_path / "none.yaml")
    misspelt = write(tmp_path, "misspelt.yaml", "temprature: 0.3\n")
    with pytest.raises(ConfigError, match=r"temprature: unknown key \(did you mean 'sampling -> temperature'\?\)"):
        resolve(config_file=misspelt, environ={}, user_file=tmp_path / "none.yaml")
    section = write(tmp_path, "section.yaml", "samplng: {}\n")
    with pytest.raises(ConfigError, match=r"samplng: unknown key \(did you mean 'sampling'\?\)"):
        resolve(config_file=section, environ={}, user_file=tmp_path / "none.yaml")


def test_invalid_yaml_names_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", "sampling:\n  temperature: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        resolve(config_file=bad, environ={}, user_file=tmp_path / "none.yaml")


def test_a_character_yaml_refuses_is_named_with_its_line_and_column(tmp_path):
    """A NUL byte said "invalid YAML: invalid YAML", with no place (PyYAML's ReaderError has no mark)."""
    bad = write(tmp_path, "nul.yaml", "sampling:\n  temperature: 0.5\x00\n")
    with pytest.raises(ConfigError) as caught:
        resolve(config_file=bad, environ={}, user_file=tmp_path / "none.yaml")
    assert caught.value.message == f"{bad}:2:19: invalid YAML: special characters are not allowed (U+0000)"


def test_a_key_given_twice_is_an_error_not_a_setting_quietly_lost(tmp_path):
    twice = write(tmp_path, "twice.yaml", "sampling:\n  temperature: 0.2\n  top_p: 0.9\n  temperature: 0.8\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml:4: 'temperature' is given twice in the same mapping"):
        resolve(config_file=twice, environ={}, user_file=tmp_path / "none.yaml")
    merged = write(tmp_path, "merged.yaml", "base: &b {temperature: 0.2}\nsampling:\n  <<: *b\n  top_p: 0.9\n")
    with pytest.raises(ConfigError, match="base: unknown key"):  # anchors and merge keys are no duplicates
        resolve(config_file=merged, environ={}, user_file=tmp_path / "none.yaml")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"sampling.temperature": -1}, "sampling.temperature must be >= 0, got -1.0"),
        ({"sampling.top_p": 0}, "sampling.top_p must be in (0, 1], got 0.0"),
        ({"sampling.top_p": 1.5}, "sampling.top_p must be in (0, 1], got 1.5"),
        ({"sampling.max_tokens": 0}, "sampling.max_tokens must be >= 1, got 0"),
        ({"device": "gpu"}, "device must be one of auto, cpu, cuda, got 'gpu'"),
        ({"sampling.top_k": -2}, "sampling.top_k must be >= -1 (0 or -1, vLLM's, turns it off), got -2"),
        ({"sampling.min_p": 1.5}, "sampling.min_p must be in [0, 1] (1: the likeliest token alone), got 1.5"),
    ],
)
def test_range_errors_name_key_and_flag(tmp_path, flags, message):
    with pytest.raises(ConfigError) as info:
        resolve(flags=flags, environ={}, user_file=tmp_path / "none.yaml")
    assert message in str(info.value)
    assert "--" in info.value.hint


def test_the_off_values_the_server_takes_are_taken_by_flags_and_batch_lines_too(tmp_path):
    """QA: the server took vLLM's top_k -1 and min_p 1, and a batch line or --top-k -1 refused them."""
    settings = resolve(flags={"sampling.top_k": -1, "sampling.min_p": 1}, environ={}, user_file=tmp_path / "n.yaml")
    assert (settings.settings.sampling.top_k, settings.settings.sampling.min_p) == (-1, 1)


def test_bad_env_value_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=r"\$GPTCLI_TEMPERATURE: sampling.temperature must be a number"):
        resolve(environ={"GPTCLI_TEMPERATURE": "hot"}, user_file=tmp_path / "none.yaml")


@pytest.mark.parametrize("value", ["nan", "hot", "-1"])
def test_a_bad_value_hints_at_the_variable_or_file_key_it_came_from_not_the_flag(tmp_path, value):
    """`GPTCLI_TEMPERATURE=nan` got the hint 'flag --temperature', a flag the user never gave."""
    with pytest.raises(ConfigError) as info:
        resolve(environ={"GPTCLI_TEMPERATURE": value}, user_file=tmp_path / "none.yaml")
    assert info.value.hint == "environment variable GPTCLI_TEMPERATURE"
    config = write(tmp_path, "c.yaml", f"sampling:\n  temperature: {value}\n")
    with pytest.raises(ConfigError) as info:
        resolve(config_file=config, environ={}, user_file=tmp_path / "none.yaml")
    assert str(info.value).startswith(f"{config}: sampling.temperature must be")
    assert info.value.hint == "config key sampling.temperature"


def test_an_empty_env_variable_counts_as_not_set(tmp_path):
    cfg = write(tmp_path, "c.yaml", "threads: 3\nsampling:\n  temperature: 0.5\n")
    empty = {"GPTCLI_THREADS": "", "GPTCLI_TEMPERATURE": ""}  # was "must be a whole number, got ''"
    settings = resolve(config_file=cfg, environ=empty, user_file=tmp_path / "n").settings
    assert settings.threads == 3 and settings.sampling.temperature == 0.5


def test_stop_list_from_yaml_and_env(tmp_path):
    cfg = write(tmp_path, "c.yaml", "sampling:\n  stop: ['###', 'END']\n")
    assert resolve(config_file=cfg, environ={}, user_file=tmp_path / "n").settings.sampling.stop == ("###", "END")
    env = {"GPTCLI_STOP": "a,b"}
    assert resolve(environ=env, user_file=tmp_path / "n").settings.sampling.stop == ("a", "b")


def test_one_engine_for_settings_and_training_config():
    from gptcli.coercion import coerce_value
    from gptcli.config import Settings, flatten
    from gptcli.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"^f.yaml: optim -> lrr: unknown key \(did you mean 'lr'\?\)$"):
        flatten({"optim": {"lrr": 1}}, TrainConfig, "f.yaml")
    with pytest.raises(ConfigError, match=r"^f.yaml: lr: unknown key \(did you mean 'optim -> lr'\?\)$"):
        flatten({"lr": 1}, TrainConfig, "f.yaml")
    assert flatten({"sampling": {"top_k": 3}, "model": "m"}, Settings, "f") == {"sampling.top_k": 3, "model": "m"}
    assert coerce_value("train.threads", int | None, None, "x") is None
    assert coerce_value("sampling.stop", tuple[str, ...], "END", "x") == ("END",)
    assert coerce_value("train.compile", bool, "yes", "x") is True
    with pytest.raises(ConfigError, match=r"^--set: train.compile must be true or false, got 'maybe'$"):
        coerce_value("train.compile", bool, "maybe", "--set")
    with pytest.raises(ConfigError, match=r"must be one of auto, cpu, cuda, got 'cdua' \(did you mean 'cuda'\?\)"):
        coerce_value("train.device", str, "cdua", "x", choices=("auto", "cpu", "cuda"))


@pytest.mark.parametrize(("typed", "meant"), [("gpu", "cuda"), ("GPU", "cuda"), ("CUDA", "cuda"), ("CPU", "cpu")])
def test_a_device_by_another_name_or_case_suggests_the_choice_it_means(typed, meant):
    """`--device gpu` was asked 'did you mean 'cpu'?' (the nearest spelling); GPU and CUDA got no suggestion."""
    with pytest.raises(ConfigError, match=rf"got '{typed}' \(did you mean '{meant}'\?\)$"):
        coerce(FIELDS["device"], typed, "--device")
    with pytest.raises(ConfigError, match=r"got 'bf16' \(did you mean 'bfloat16'\?\)$"):
        coerce(FIELDS["dtype"], "bf16", "--dtype")


# ------------------------------------------------------------------ gptcli config init / show (subprocess)


def test_config_init_writes_every_key_with_its_default_commented_out(tmp_path):
    import re

    import yaml

    from gptcli.config import FIELDS, Settings, get_value
    from tests.conftest import run_cli

    user = tmp_path / "xdg-config" / "gptcli" / "config.yaml"
    result = run_cli("config", "init")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode() == f"wrote {user}\n" and result.stdout.decode() == ""
    text = user.read_text()
    assert yaml.safe_load(text) == {"sampling": None}  # all commented out: the file changes nothing
    shown = run_cli("config", "show", "--json")
    assert {v["source"] for v in yaml.safe_load(shown.stdout).values()} == {"default"}
    # Uncommented, every key is there once, at its default, with its flag and environment variable named.
    keys = re.findall(r"^( *)# (\w+): (.*?) +# (--[\w-]+), \$(GPTCLI_\w+)$", text, flags=re.M)
    found = {("sampling." if indent else "") + name: value for indent, name, value, _, _ in keys}
    assert list(found) == list(FIELDS)
    for spec in FIELDS.values():  # each choice list is written once, after what the key does
        if spec.choices:
            assert text.count(" | ".join(spec.choices)) == 1, spec.flag
    for key, value in found.items():
        default = get_value(Settings(), key)
        assert yaml.safe_load(value) == (list(default) if isinstance(default, tuple) else default), key
    uncommented = re.sub(r"^( *)# (\w+: .*?) +# --.*$", r"\1\2", text, flags=re.M)
    user.write_text(uncommented)
    data = yaml.safe_load(run_cli("config", "show", "--json").stdout)
    assert {v["source"] for v in data.values()} == {str(user)}
    assert all(v["value"] == yaml.safe_load(found[k]) for k, v in data.items())


def test_config_init_refuses_to_replace_a_file_without_force(tmp_path):
    from tests.conftest import run_cli

    target = tmp_path / "mine.yaml"
    target.write_text("model: mine\n")
    result = run_cli("config", "init", str(target))
    assert result.returncode == 6
    assert result.stderr.decode() == f"error: {target} already exists\nhint: add --force to replace it\n"
    assert target.read_text() == "model: mine\n"
    forced = run_cli("config", "init", str(target), "--force")
    assert forced.returncode == 0 and target.read_text().startswith("# gptcli settings")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind
    folder = run_cli("config", "init", str(tmp_path))
    assert folder.returncode == 6 and folder.stderr.decode().startswith(f"error: {tmp_path} is a folder\n")
    printed = subprocess.run(
        [sys.executable, "-m", "gptcli", "config", "init", "-"], cwd=tmp_path, capture_output=True, timeout=60
    )  # - is stdout (it wrote a file named "-")
    assert printed.returncode == 0 and printed.stdout.decode().startswith("# gptcli settings"), printed.stderr
    assert not (tmp_path / "-").exists()


def test_config_show_says_which_files_it_looked_for(tmp_path):
    from tests.conftest import run_cli

    user = tmp_path / "xdg-config" / "gptcli" / "config.yaml"
    extra = write(tmp_path, "extra.yaml", "sampling:\n  top_p: 0.5\n")
    result = run_cli("config", "show", "--config", str(extra), env={"GPTCLI_SEED": "3", "GPTCLI_MAX_TOKENS": ""})
    assert result.returncode == 0
    head = result.stdout.decode().split("\n\n")[0].splitlines()
    assert head == [
        "config files, lowest precedence first:",
        f"  user      {user} (not found)",
        f"  --config  {extra} (found)",
        "environment: GPTCLI_SEED",  # an empty variable is not a setting
    ]
    user.parent.mkdir(parents=True)
    user.write_text("model: x\n")
    as_json = run_cli("config", "show", "--json")
    assert f"  user      {user} (found)" in as_json.stderr.decode().splitlines()
    assert "environment: no GPTCLI_* setting" in as_json.stderr.decode()
    assert json.loads(as_json.stdout)["model"] == {"value": "x", "source": str(user)}


def test_a_missing_config_file_hints_at_the_path_and_minus_c_a_number_at_what_c_is(tmp_path, capsys):
    from gptcli.cli.app import run

    assert run(["config", "show", "-c", str(tmp_path / "nope.yaml")]) == 3
    assert capsys.readouterr().err == f"error: config file not found: {tmp_path / 'nope.yaml'}\nhint: check the path\n"
    assert run(["generate", "hi", "-c", "2048"]) == 3  # llama.cpp's -c is the context size
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: config file not found: 2048"
    assert err[1].startswith("hint: -c is --config, a YAML file (not llama.cpp's context size")


def test_a_folder_where_the_user_config_file_goes_stops_every_command_as_a_config_folder_does(
    tiny_models, capsys, monkeypatch
):
    """It was skipped: `generate` ran with the defaults and only `config show` said 'a folder, not a file'."""
    import io

    from gptcli.cli.app import run

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # generate reads a piped stdin first
    from gptcli.paths import user_config_file

    user = user_config_file()
    user.mkdir(parents=True)
    said = [
        f"error: the user config file {user} is a folder, not a file",
        "hint: remove or rename that folder; `gptcli config init` writes the file there",
    ]
    for command in (["generate", "-m", str(tiny_models["gpt2"]), "hi", "-n", "2"], ["config", "show"]):
        assert run(command) == 3
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines() == said
    assert run(["config", "path"]) == 0 and capsys.readouterr().out == f"{user}\n"  # how to find it still works


def test_an_empty_model_is_a_config_error_not_the_current_folder(tmp_path, capsys, monkeypatch):
    """`--model ""` or `model: ""` in a config file was read as the path '.': "error: . is not a model folder
    (no config.json)" (exit 5), naming a folder the user never gave."""
    import io

    from gptcli.cli.app import run

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert run(["generate", "--model", "", "hi", "-n", "2"]) == 3
    assert (
        capsys.readouterr().err.splitlines()[0] == "error: --model: model must be a model name, folder or file, got ''"
    )
    cfg = write(tmp_path, "c.yaml", 'model: " "\n')
    with pytest.raises(ConfigError, match=r"c\.yaml: model must be a model name, folder or file, got ' '"):
        resolve(config_file=cfg, environ={}, user_file=tmp_path / "none.yaml")
    assert resolve(environ={"GPTCLI_MODEL": ""}, user_file=tmp_path / "n").sources["model"] == "default"


def test_a_choice_in_the_wrong_case_suggests_the_right_spelling():
    """'Int8' was told 'did you mean int8?' but 'INT4' (and --backend ONNX) nothing: difflib minds case."""
    from gptcli.backends.base import get_backend_class
    from gptcli.errors import BackendError

    with pytest.raises(ConfigError, match=r"got 'INT4' \(did you mean 'int4'\?\)$"):
        resolve(flags={"precision": "INT4"}, environ={}, user_file=Path("/nonexistent/gptcli.yaml"))
    with pytest.raises(BackendError, match=r"^unknown backend 'ONNX' \(did you mean 'onnx'\?\)$"):
        get_backend_class("ONNX")
