"""Backend plugins through real entry points: lazy import, broken plugins, conflicts, GPTCLI_PLUGINS.

Each test installs fake plugin distributions the way pip would leave them (a `*.dist-info` folder
with METADATA and entry_points.txt next to the module) into a folder put on PYTHONPATH, then runs
the real program in a subprocess.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gptcli.backends.base import LoadOptions
from tests.conftest import run_cli

GOOD_MODULE = """
import os
from pathlib import Path
from tests.scripted import ScriptedBackend

Path(os.environ["PLUGIN_MARKERS"], "good_plugin imported").touch()


class GoodBackend(ScriptedBackend):
    name = "good"
"""
BROKEN_MODULE = 'raise ImportError("libfoo.so: cannot open shared object file")\n'


def _install(site: Path, dist: str, version: str, entry_points: dict[str, str]) -> None:
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[gptcli.backends]\n{lines}")


@pytest.fixture
def plugin_env(tmp_path) -> dict[str, str]:
    """Three installed plugins: a working one, one that cannot import, one claiming 'torch'."""
    site = tmp_path / "site"
    markers = tmp_path / "markers"
    site.mkdir()
    markers.mkdir()
    (site / "good_plugin.py").write_text(GOOD_MODULE)
    (site / "broken_plugin.py").write_text(BROKEN_MODULE)
    _install(site, "gptcli-good", "1.2.3", {"good": "good_plugin:GoodBackend"})
    _install(site, "gptcli-broken", "0.0.1", {"broken": "broken_plugin:BrokenBackend"})
    _install(site, "gptcli-thief", "9.9", {"torch": "good_plugin:GoodBackend"})
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": path, "PLUGIN_MARKERS": str(markers)}


def _rows(result) -> dict[str, list[dict]]:
    assert result.returncode == 0, result.stderr.decode()
    rows: dict[str, list[dict]] = {}
    for row in json.loads(result.stdout):
        rows.setdefault(row["name"], []).append(row)
    return rows


def test_backends_lists_good_broken_and_conflicting_plugins(plugin_env):
    rows = _rows(run_cli("backends", "--json", env=plugin_env))
    good = rows["good"][0]
    assert good["status"] == "ok"
    assert (good["origin"], good["distribution"], good["version"]) == ("gptcli-good 1.2.3", "gptcli-good", "1.2.3")
    broken = rows["broken"][0]
    assert (broken["distribution"], broken["version"]) == ("gptcli-broken", "0.0.1")
    assert broken["status"] == (
        "backend 'broken' (gptcli-broken 0.0.1) failed to load: ImportError: libfoo.so: cannot open shared object file"
    )
    builtin, thief = rows["torch"]
    assert builtin["origin"] == "built-in" and builtin["status"] == "ok" and not builtin["conflict"]
    assert thief["conflict"] and thief["distribution"] == "gptcli-thief"
    assert "claims the name 'torch' of the built-in backend" in thief["status"]


def test_backends_table_shows_distribution_and_error(plugin_env):
    result = run_cli("backends", env=plugin_env)
    assert result.returncode == 0
    out = result.stdout.decode()
    assert "gptcli-broken 0.0.1" in out and "ImportError: libfoo.so" in out
    assert "gptcli-thief 9.9" in out


def test_only_the_selected_backend_is_imported(plugin_env, tiny_models):
    markers = Path(plugin_env["PLUGIN_MARKERS"])
    env = {
        **plugin_env,
        "GPTCLI_BACKEND_PATHS": "scripted=tests.scripted:ScriptedBackend",
        "GPTCLI_TEST_SCRIPT": "[5, 6, 7]",
    }
    args = ["generate", "hi", "--model", str(tiny_models["llama"]), "--raw", "-n", "3", "--temperature", "0"]
    result = run_cli(*args, "--backend", "scripted", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert not list(markers.iterdir()), "an unselected plugin was imported"
    assert run_cli("config", "show", env=env).returncode == 0  # the broken plugin breaks nothing else

    chosen = run_cli(*args, "--backend", "good", env=env)
    assert chosen.returncode == 0, chosen.stderr.decode()
    assert chosen.stdout == result.stdout
    assert (markers / "good_plugin imported").exists()


def test_selecting_a_broken_plugin_is_a_backend_error(plugin_env):
    result = run_cli("generate", "hi", "--backend", "broken", env=plugin_env)
    assert result.returncode == 4
    lines = result.stderr.decode().splitlines()
    assert lines[0].startswith("error: backend 'broken' (gptcli-broken 0.0.1) failed to load: ImportError")
    assert lines[1].startswith("hint: ")


ODD_MODULE = """
class _Backend:
    @classmethod
    def load(cls, path, options):
        raise AssertionError("never loaded")


class Raises(_Backend):
    @classmethod
    def unavailable_reason(cls, device):
        raise ValueError("no driver table")


class Number(_Backend):
    @classmethod
    def unavailable_reason(cls, device):
        return 42
"""


def test_a_plugin_that_exits_or_answers_wrongly_is_named(tmp_path, monkeypatch, capsys):
    from gptcli.cli.app import run

    (tmp_path / "exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "odd_plugin.py").write_text(ODD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    paths = "exits=exiting_plugin:Backend,raises=odd_plugin:Raises,number=odd_plugin:Number"
    monkeypatch.setenv("GPTCLI_BACKEND_PATHS", paths)
    # `backends` exited 3 with no output (the import's SystemExit), or crashed on the 42 (internal error)
    assert run(["backends", "--json"]) == 0
    rows = {row["name"]: row["error"] for row in json.loads(capsys.readouterr().out)}
    origin = "(GPTCLI_BACKEND_PATHS)"
    expected = {
        "exits": f"backend 'exits' {origin} failed to load: SystemExit: 3",
        "raises": f"backend 'raises' {origin} failed in unavailable_reason(): ValueError: no driver table",
        "number": f"backend 'number' {origin}: unavailable_reason() gave 42, not a string or None",
    }
    assert {name: rows[name] for name in expected} == expected
    assert run(["backends"]) == 0
    # choosing one: exit 4 naming it (it was exit 3 unexplained, or "internal error: ValueError" exit 1)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH", "")]))}
    for name, said in expected.items():
        result = run_cli("generate", "-b", name, "hi", env=env)
        assert result.returncode == 4, result.stderr.decode()
        error = result.stderr.decode().splitlines()[0]
        assert error == "error: " + (said if name == "exits" else said.replace(f" {origin}", ""))


def test_a_plugin_that_prints_leaves_the_json_listing_whole(tmp_path, monkeypatch, capsys):
    from gptcli.cli.app import run

    (tmp_path / "noisy_plugin.py").write_text(
        "print('noisy: imported')\n"
        "class Noisy:\n"
        "    @classmethod\n"
        "    def load(cls, path, options): ...\n"
        "    @classmethod\n"
        "    def unavailable_reason(cls, device):\n"
        "        print('noisy: asked')\n"
        "        return 'needs its card'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GPTCLI_BACKEND_PATHS", "noisy=noisy_plugin:Noisy")
    assert run(["backends", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = {row["name"]: row["status"] for row in json.loads(out)}  # the prints came first on stdout: not JSON
    assert rows["noisy"] == "needs its card"
    assert err.splitlines() == ["noisy: imported", "noisy: asked"]


def test_a_plugin_cannot_take_a_builtin_name(plugin_env, monkeypatch):
    from gptcli.backends import base
    from gptcli.backends.torch_backend import TorchBackend

    monkeypatch.syspath_prepend(plugin_env["PYTHONPATH"].split(os.pathsep)[0])
    monkeypatch.setenv("PLUGIN_MARKERS", plugin_env["PLUGIN_MARKERS"])
    assert base.get_backend_class("torch") is TorchBackend
    assert base.backend_names()[:1] == ["torch"] and base.backend_names().count("torch") == 1


def test_a_builtin_backend_loads_without_reading_any_entry_point(monkeypatch):
    from gptcli.backends import base
    from gptcli.backends.onnx_backend import OnnxBackend

    monkeypatch.setattr(base, "plugin_entry_points", lambda: pytest.fail("entry points read for a built-in"))
    assert base.get_backend_class("onnx") is OnnxBackend


def test_two_plugins_claiming_one_name_conflict(tmp_path, monkeypatch):
    from gptcli.backends import base

    site = tmp_path / "site"
    site.mkdir()
    _install(site, "gptcli-first", "1.0", {"same": "first_mod:Backend"})
    _install(site, "gptcli-second", "2.0", {"same": "second_mod:Backend"})
    monkeypatch.syspath_prepend(str(site))
    same = [s for s in base.list_backends() if s.name == "same"]
    assert len(same) == 2
    assert [s.conflict is None for s in same].count(True) == 1
    loser = next(s for s in same if s.conflict)
    assert "claims the name 'same' of the backend from" in loser.conflict


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("none", set()),
        ("good", {"good"}),
        ("good, broken", {"good", "broken"}),
        ("all", {"good", "broken"}),
        (",", {"good", "broken"}),  # names none: as unset (it hid every plugin without a word)
    ],
)
def test_gptcli_plugins_limits_loading(plugin_env, value, expected):
    rows = _rows(run_cli("backends", "--json", env={**plugin_env, "GPTCLI_PLUGINS": value}))
    plugins = {name for name, found in rows.items() if any(r["distribution"] for r in found)} - {"torch"}
    assert plugins & {"good", "broken"} == expected  # other installed plugins (llamacpp) may add rows
    if value == "none":
        assert plugins == set()
    assert rows["torch"][0]["origin"] == "built-in"


def test_a_plugin_name_no_plugin_has_is_a_warning(plugin_env):
    result = run_cli("backends", "--json", env={**plugin_env, "GPTCLI_PLUGINS": "godo,good"})
    assert result.returncode == 0
    warning = result.stderr.decode()
    assert warning.startswith("warning: GPTCLI_PLUGINS names 'godo' (did you mean 'good'?), which no installed")
    assert "'good'" not in warning.split("installed plugins:")[0].replace("(did you mean 'good'?)", "")
    assert "good" in _rows(result)
    quiet = run_cli("backends", "--json", env={**plugin_env, "GPTCLI_PLUGINS": "good"})
    assert quiet.stderr.decode() == ""


def test_a_plugin_turned_off_says_so(plugin_env):
    result = run_cli("generate", "hi", "--backend", "good", env={**plugin_env, "GPTCLI_PLUGINS": "none"})
    assert result.returncode == 4
    assert result.stderr.decode().splitlines() == [
        "error: backend 'good' is a plugin turned off by GPTCLI_PLUGINS=none",
        "hint: add 'good' to GPTCLI_PLUGINS, or unset it",
    ]


# The contract kit must be able to fail: each broken backend below breaks one promise.


class _Float64Logits:
    """Wraps the torch backend and returns float64 logits."""

    name = "float64"

    def __init__(self, inner):
        self.inner, self.info = inner, inner.info

    @classmethod
    def unavailable_reason(cls, device="auto"):
        return None

    @classmethod
    def load(cls, folder, options):
        from gptcli.backends.torch_backend import TorchBackend

        return cls(TorchBackend.load(folder, options))

    def new_cache(self):
        return self.inner.new_cache()

    def forward(self, ids, cache):
        logits, cache = self.inner.forward(ids, cache)
        return logits.astype(np.float64), cache

    def truncate(self, cache, length):
        return self.inner.truncate(cache, length)


class _ForgetfulCache(_Float64Logits):
    """Runs every call on a fresh cache: the prefix is lost between calls."""

    name = "forgetful"

    def forward(self, ids, cache):
        logits, fresh = self.inner.forward(ids, self.inner.new_cache())
        fresh.length = cache.length + len(ids)
        return logits, fresh


class _NoTruncate(_Float64Logits):
    name = "no-truncate"

    def forward(self, ids, cache):
        return self.inner.forward(ids, cache)

    def truncate(self, cache, length):
        return cache


@pytest.mark.parametrize(
    ("broken", "message"),
    [(_Float64Logits, "float32"), (_ForgetfulCache, "token-by-token"), (_NoTruncate, "truncate")],
)
def test_contract_kit_catches_broken_backends(tiny_models, broken, message):
    from gptcli.testing import check_backend_contract

    with pytest.raises(AssertionError, match=message):
        check_backend_contract(broken, tiny_models["llama"])


def test_contract_kit_greedy_parity_and_margin(tiny_models):
    """Two different models disagree on greedy tokens; a huge margin accepts them, expected_greedy pins them."""
    from gptcli.backends.torch_backend import TorchBackend
    from gptcli.testing import check_backend_contract, check_greedy_parity, greedy_ids

    options = LoadOptions(device="cpu", dtype="float32")
    llama = TorchBackend.load(tiny_models["llama"], options)
    prompt = [3, 4, 5, 6, 7, 8, 9, 10]
    expected = greedy_ids(llama, prompt, 6)
    check_backend_contract(TorchBackend, tiny_models["llama"], prompt=prompt, expected_greedy=expected)
    with pytest.raises(AssertionError, match="greedy tokens"):
        check_backend_contract(TorchBackend, tiny_models["llama"], prompt=prompt, expected_greedy=expected[::-1])

    # A "quantised" stand-in: the reference is the same model with slightly perturbed weights.
    noisy = _perturbed_copy(tiny_models["llama"], tiny_models["llama"].parent / "tiny-llama-noisy")
    with pytest.raises(AssertionError, match="logits vs the reference"):
        check_backend_contract(TorchBackend, tiny_models["llama"], reference=TorchBackend, reference_folder=noisy)
    # Its greedy picks differ from the reference's: with no margin (the default) the kit fails on that alone.
    with pytest.raises(AssertionError, match=r"greedy step \d+: backend picks token \d+, reference picks \d+"):
        check_backend_contract(
            TorchBackend,
            tiny_models["llama"],
            reference=TorchBackend,
            reference_folder=noisy,
            compare_reference_logits=False,
        )
    # The margin is a bound, not a switch: just under the widest gap fails, the widest gap itself passes.
    noisy_backend = TorchBackend.load(noisy, options)
    widest = _widest_greedy_gap(llama, noisy_backend, prompt, 16)
    assert widest > 0
    with pytest.raises(AssertionError, match="greedy step"):
        check_greedy_parity(llama, noisy_backend, prompt, 16, margin=widest * 0.99)
    check_backend_contract(
        TorchBackend,
        tiny_models["llama"],
        prompt=prompt,
        reference=TorchBackend,
        reference_folder=noisy,
        compare_reference_logits=False,
        greedy_margin=widest,
    )


def _widest_greedy_gap(backend, reference, prompt: list[int], steps: int) -> float:
    """Along the reference's greedy path: the largest reference-logit gap between its pick and the backend's."""
    from gptcli.testing import greedy_ids, step_logits

    path = greedy_ids(reference, prompt, steps)
    gaps = [
        float(ref[wanted] - ref[int(np.argmax(mine))])
        for mine, ref, wanted in zip(
            step_logits(backend, prompt, path), step_logits(reference, prompt, path), path, strict=True
        )
    ]
    return max(gaps)


def _perturbed_copy(folder: Path, dest: Path) -> Path:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    if (dest / "config.json").is_file():
        return dest
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            shutil.copy(folder / name, dest / name)
    return dest
