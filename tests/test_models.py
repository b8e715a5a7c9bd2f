import json
import shutil

import pytest

from gptcli.config import DEFAULT_MODEL
from gptcli.errors import ModelError
from gptcli.models import CATALOGUE, catalogue_entry, describe, resolve_model


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_resolves_a_local_folder(tiny_models):
    local = resolve_model(str(tiny_models["llama"]))
    assert local.path == tiny_models["llama"].resolve()


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="is not a model folder"):
        resolve_model(str(tmp_path))


def test_truncated_safetensors_is_rejected(tiny_models, tmp_path):
    folder = copy_model(tiny_models["gpt2"], tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"corrupt safetensors file .*truncated") as info:
        resolve_model(str(folder))
    assert info.value.exit_code == 5


def test_garbage_safetensors_is_rejected(tiny_models, tmp_path):
    folder = copy_model(tiny_models["gpt2"], tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="corrupt safetensors"):
        resolve_model(str(folder))


def test_pickled_weights_refused_unless_allowed(tiny_models, tmp_path):
    folder = copy_model(tiny_models["gpt2"], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="only pickled weights") as info:
        resolve_model(str(folder))
    assert "--allow-pickle" in info.value.hint
    assert resolve_model(str(folder), allow_pickle=True).path == folder.resolve()


def test_unknown_alias_suggests(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'smol'") as info:
        resolve_model("smol")
    assert "gptcli models list" in info.value.hint


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="no such file or folder"):
        resolve_model(str(tmp_path / "nope" / "model.gguf"))


def test_hub_id_offline_is_exit_5(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot fetch 'someone/some-model' from the hub") as info:
        resolve_model("someone/some-model")
    assert info.value.exit_code == 5


def test_describe_reads_headers_only(tiny_models):
    facts = describe(resolve_model(str(tiny_models["llama"])))
    cfg = json.loads((tiny_models["llama"] / "config.json").read_text())
    assert facts["layers"] == 2
    assert facts["context_length"] == cfg["max_position_embeddings"]
    assert facts["vocab_size"] == cfg["vocab_size"]
    assert facts["dtype"] == "F32"
    assert facts["params"] > 0


def test_a_catalogue_name_or_alias_in_another_case_names_the_catalogue_model():
    """`models pull GEMMA3-270M` said "unknown model" with no suggestion: a name is not case-sensitive."""
    assert catalogue_entry("GEMMA3-270M") is CATALOGUE["gemma3-270m"]
    assert catalogue_entry("Default") is CATALOGUE[DEFAULT_MODEL]
    with pytest.raises(ModelError, match=r"^model 'gemma3-270m' is not pulled yet$"):
        resolve_model("Gemma3-270M")


def test_an_existing_path_spelt_like_a_name_in_another_case_is_the_path(tiny_models, tmp_path, monkeypatch):
    copy_model(tiny_models["llama"], tmp_path / "Default")
    monkeypatch.chdir(tmp_path)
    assert catalogue_entry("Default") is None
    assert resolve_model("Default").path == (tmp_path / "Default").resolve()


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("jemma3-270m", "unknown model 'jemma3-270m' (did you mean 'gemma3-270m'?)"),
        ("GEMA3-270M", "unknown model 'GEMA3-270M' (did you mean 'gemma3-270m'?)"),
        ("smoothie", "unknown model 'smoothie'"),  # was "did you mean 'smollm2-135m-instruct'", on 3 letters
    ],
)
def test_an_unknown_model_suggests_the_closest_name(ref, message):
    with pytest.raises(ModelError) as info:
        resolve_model(ref)
    assert info.value.message == message
