"""A plugin whose load raises, or whose logits break the protocol, is a one-line BackendError naming it (exit 4).

A wrong shape was sampled from (a wrong answer, exit 0) or failed deep in the engine, NaN logits failed in
sampling, a step with fewer rows than asked failed in a zip, and a raising load or forward was an internal error
(which says gptcli has a bug): all exit 1 with a traceback hint, none naming the plugin.
"""

from __future__ import annotations

import io

import pytest

MODULE = """
import json

import numpy as np

from tests.scripted import ScriptedBackend


class Good(ScriptedBackend):
    name = "good"

    @classmethod
    def load(cls, folder, options):
        return cls([5, 6, 7, 8, 9] * 4, json.loads((folder / "config.json").read_text())["vocab_size"])


class Raises(Good):
    name = "raises"

    @classmethod
    def load(cls, folder, options):
        raise RuntimeError("libfoo went away")


class Short(Good):
    name = "short"

    def forward(self, ids, cache):
        logits, cache = super().forward(ids, cache)
        return logits[:-10], cache


class Nan(Good):
    name = "nan"

    def forward(self, ids, cache):
        logits, cache = super().forward(ids, cache)
        return np.full_like(logits, np.nan), cache


class Fewer(Good):
    name = "fewer"

    def step(self, batch):
        rows = [self.forward(ids, cache) for ids, cache in batch]
        return np.stack([row for row, _ in rows])[:-1], [cache for _, cache in rows]


class Boom(Good):
    name = "boom"

    def forward(self, ids, cache):
        raise RuntimeError("CUDA kernel launch failed")


class Score(Good):
    name = "score"

    def score(self, ids, cache):
        logits, cache = self.forward(ids, cache)
        return logits[None, :], cache
"""

EXPECTED = {
    "raises": "backend 'raises' failed to load tiny-llama: RuntimeError: libfoo went away",
    "short": "backend 'short': forward() gave logits of shape (390,), not (400,) (vocabulary,)",
    "nan": "backend 'nan': forward() gave NaN logits",
    "boom": "backend 'boom' failed in forward(): RuntimeError: CUDA kernel launch failed",
    "fewer": "backend 'fewer': step() gave logits of shape (0, 400), not (1, 400) (rows, vocabulary)",
}


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "odd_outputs.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ["good", *EXPECTED, "score"]
    paths = ",".join(f"{name}=odd_outputs:{name.capitalize()}" for name in names)
    monkeypatch.setenv("GPTCLI_BACKEND_PATHS", paths)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no piped text: the prompt is the argument


@pytest.mark.parametrize("name", EXPECTED)
def test_a_plugin_that_fails_to_load_or_breaks_the_logits_contract_is_named(tiny_models, plugins, capsys, name):
    from gptcli.cli.app import run

    args = ["generate", "--model", str(tiny_models["llama"]), "--max-tokens", "3", "hi"]
    assert run([*args, "--backend", "good"]) == 0
    capsys.readouterr()
    assert run([*args, "--backend", name]) == 4
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "error: " + EXPECTED[name],
        "hint: reinstall or remove the plugin; `gptcli backends` lists every backend",
    ]


def test_scored_logits_of_the_wrong_shape_are_named(tiny_models, plugins):
    from gptcli.backends.base import LoadOptions, get_backend_class, score_positions
    from gptcli.errors import BackendError

    backend = get_backend_class("score").load(tiny_models["llama"], LoadOptions())
    with pytest.raises(BackendError, match=r"'score': score\(\) gave logits of shape \(1, 400\), not \(2, 400\)"):
        score_positions(backend, [5, 6], backend.new_cache())


INSTALLED = {  # entry point → (its class, what the error says after the backend's name)
    "llamacpp": ("Boom", " failed in forward(): RuntimeError: CUDA kernel launch failed"),
    "llamacpp-nan": ("Nan", ": forward() gave NaN logits"),
    "llamacpp-load": ("Raises", " failed to load tiny-llama: RuntimeError: libfoo went away"),
}


@pytest.mark.parametrize("name", INSTALLED)
def test_an_installed_plugins_error_names_its_entry_point_and_distribution(
    tiny_models, plugins, tmp_path, monkeypatch, capsys, name
):
    """The user typed `--backend llamacpp`: the error names that and its distribution, not what the plugin's class
    calls itself ('boom')."""
    from gptcli.cli.app import run
    from tests.test_plugins import _install

    site = tmp_path / "site"
    _install(site, "gptcli-llamacpp", "0.1.0", {n: f"odd_outputs:{cls}" for n, (cls, _) in INSTALLED.items()})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("GPTCLI_BACKEND_PATHS")
    assert run(["generate", "--model", str(tiny_models["llama"]), "--max-tokens", "3", "hi", "--backend", name]) == 4
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: backend '{name}' (gptcli-llamacpp 0.1.0){INSTALLED[name][1]}",
        "hint: reinstall or remove the plugin; `gptcli backends` lists every backend",
    ]


def test_outputs_name_a_plugin_by_its_entry_point(tiny_models, plugins, tmp_path, monkeypatch, capsys):
    """`--backend mine` for a class that calls itself 'good': --json and --stats say 'mine', as errors do."""
    import json

    from gptcli.cli.app import run
    from tests.test_plugins import _install

    site = tmp_path / "site"
    _install(site, "gptcli-mine", "0.2.0", {"mine": "odd_outputs:Good"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("GPTCLI_BACKEND_PATHS")
    common = ["generate", "--model", str(tiny_models["llama"]), "--max-tokens", "3", "hi", "--backend", "mine"]
    assert run([*common, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "mine"
    assert run([*common, "--stats"]) == 0
    err = capsys.readouterr().err
    assert "mine" in err and "good" not in err
