import pytest

from gptcli.config import resolve
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


def test_invalid_yaml_names_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", "sampling:\n  temperature: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        resolve(config_file=bad, environ={}, user_file=tmp_path / "none.yaml")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"sampling.temperature": -1}, "sampling.temperature must be >= 0, got -1.0"),
        ({"sampling.top_p": 0}, "sampling.top_p must be in (0, 1], got 0.0"),
        ({"sampling.top_p": 1.5}, "sampling.top_p must be in (0, 1], got 1.5"),
        ({"sampling.max_tokens": 0}, "sampling.max_tokens must be >= 1, got 0"),
        ({"device": "gpu"}, "device must be one of auto, cpu, cuda, got 'gpu'"),
    ],
)
def test_range_errors_name_key_and_flag(tmp_path, flags, message):
    with pytest.raises(ConfigError) as info:
        resolve(flags=flags, environ={}, user_file=tmp_path / "none.yaml")
    assert message in str(info.value)
    assert "--" in info.value.hint


def test_bad_env_value_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=r"\$GPTCLI_TEMPERATURE: sampling.temperature must be a float"):
        resolve(environ={"GPTCLI_TEMPERATURE": "hot"}, user_file=tmp_path / "none.yaml")


def test_stop_list_from_yaml_and_env(tmp_path):
    cfg = write(tmp_path, "c.yaml", "sampling:\n  stop: ['###', 'END']\n")
    assert resolve(config_file=cfg, environ={}, user_file=tmp_path / "n").settings.sampling.stop == ("###", "END")
    env = {"GPTCLI_STOP": "a,b"}
    assert resolve(environ=env, user_file=tmp_path / "n").settings.sampling.stop == ("a", "b")


def test_one_engine_for_settings_and_training_config():
    from gptcli.config import Settings, coerce_value, flatten
    from gptcli.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"^f.yaml: optim -> lrr: unknown key \(did you mean 'lr'\?\)$"):
        flatten({"optim": {"lrr": 1}}, TrainConfig, "f.yaml")
    with pytest.raises(ConfigError, match=r"^f.yaml: lr: unknown key \(did you mean 'optim -> lr'\?\)$"):
        flatten({"lr": 1}, TrainConfig, "f.yaml")
    assert flatten({"sampling": {"top_k": 3}, "model": "m"}, Settings, "f") == {"sampling.top_k": 3, "model": "m"}
    assert coerce_value("train.threads", int | None, None, "x") is None
    assert coerce_value("sampling.stop", tuple[str, ...], "END", "x") == ("END",)
    assert coerce_value("train.compile", bool, "yes", "x") is True
    with pytest.raises(ConfigError, match=r"^--set: train.compile must be a bool, got 'maybe'$"):
        coerce_value("train.compile", bool, "maybe", "--set")
    with pytest.raises(ConfigError, match=r"must be one of auto, cpu, cuda, got 'cdua' \(did you mean 'cuda'\?\)"):
        coerce_value("train.device", str, "cdua", "x", choices=("auto", "cpu", "cuda"))
