"""The MatMulNBits compute type an int8/int4 CPU export uses: measured once per machine, cached, recorded."""

from __future__ import annotations

import json

import pytest

from gptcli import tuning
from gptcli.export import nbits_choice
from gptcli.export.nbits_choice import CANDIDATES, choose_levels, measure_levels


def fake_timer(times: dict[tuple[int, int, int], float], calls: list[tuple]):
    def timer(bits, level, k, rows, limit):
        calls.append((bits, level, rows, limit))
        return times[(bits, level, rows)]

    return timer


def test_the_fastest_level_wins_per_bit_width_and_a_far_slower_one_is_not_timed_at_eight_rows():
    times = {
        (4, 4, 1): 0.010, (4, 1, 1): 0.012, (4, 4, 8): 0.050, (4, 1, 8): 0.030,  # fp32 wins on 8 rows
        (8, 4, 1): 0.002, (8, 1, 1): 0.300,  # 150x slower: dropped after one row
        (8, 4, 8): 0.004,
    }  # fmt: skip
    calls: list[tuple] = []
    choice = measure_levels((4, 8), 64, 2, fake_timer(times, calls))
    assert choice.levels == {4: 1, 8: 4}
    assert (8, 1, 8) not in {(bits, level, rows) for bits, level, rows, _ in calls}
    # The later candidate at one row may give up after twice the best time so far; eight rows always finish.
    limits = {(bits, level, rows): limit for bits, level, rows, limit in calls}
    assert limits[(8, 1, 1)] == pytest.approx(0.004) and limits[(8, 4, 8)] == float("inf")
    assert choice.timings_ms["int8 level 1 (fp32) x1"] == 300.0
    assert "int4: level 1 (fp32 compute)" in choice.reason and "int8: level 4 (int8 compute)" in choice.reason


def test_the_choice_is_measured_once_per_machine_and_cached():
    calls: list[tuple] = []
    times = {(bits, level, rows): 0.001 * level for bits in (4, 8) for level in CANDIDATES for rows in (1, 8)}
    told: list[str] = []
    first = choose_levels((8,), 64, fake_timer(times, calls), on_measure=lambda: told.append("measuring"))
    assert first.levels == {8: 1} and calls and told == ["measuring"]
    calls.clear()
    again = choose_levels((8,), 64, fake_timer(times, calls), on_measure=lambda: told.append("measuring"))
    assert again == first and calls == [] and told == ["measuring"]  # from the cache: nothing to announce
    both = choose_levels((4, 8), 64, fake_timer(times, calls))  # a bit width not measured yet: measured now
    assert both.levels == {4: 1, 8: 1} and calls
    stored = json.loads(tuning.tuning_file().read_text())
    assert stored[nbits_choice.TUNING_NAME][nbits_choice.machine_key()]["levels"] == {"4": 1, "8": 1}
    tuning.tuning_file().write_text("{not json")  # a damaged file is measured again, not an error
    assert choose_levels((8,), 64, fake_timer(times, calls)).levels == {8: 1}


def test_onnx_runtime_times_each_level_on_this_cpu():
    choice = measure_levels((4,), 576, 1, nbits_choice.ort_timer(1))
    assert choice.levels[4] in CANDIDATES
    assert choice.timings_ms["int4 level 4 (int8) x1"] > 0
    assert any(key.endswith("x8") for key in choice.timings_ms)


def test_an_int4_export_writes_the_chosen_level_into_every_matmulnbits_and_records_it(tiny_models, monkeypatch):
    import onnx
    from onnx import helper

    import gptcli.export as ex

    monkeypatch.setattr(
        nbits_choice,
        "ort_timer",
        lambda threads: fake_timer({(b, lv, r): 0.001 * lv for b in (4, 8) for lv in (1, 4) for r in (1, 8)}, []),
    )
    result = ex.ensure_export(tiny_models["llama"], precision="int4")
    levels = {
        helper.get_attribute_value(a)
        for node in onnx.load(str(result.model_path), load_external_data=False).graph.node
        if node.op_type == "MatMulNBits"
        for a in node.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {1}
    quantization = result.meta["quantization"]
    assert quantization["accuracy_level"] == {"4": 1, "8": 1}
    assert quantization["accuracy_level_choice"]["timings_ms"]["int4 level 4 (int8) x1"] == 4.0


def test_backends_json_says_which_level_this_machine_uses(capsys):
    from gptcli.cli.app import run

    assert run(["backends", "--json"]) == 0
    onnx_row = next(row for row in json.loads(capsys.readouterr().out) if row["name"] == "onnx")
    assert (
        onnx_row["auto"]["matmulnbits_accuracy_level"] is None
        and "first int8/int4 export" in onnx_row["auto"]["reason"]
    )
    choose_levels((4, 8), 64, fake_timer({(b, lv, r): 0.001 for b in (4, 8) for lv in (1, 4) for r in (1, 8)}, []))
    assert run(["backends", "--json"]) == 0
    onnx_row = next(row for row in json.loads(capsys.readouterr().out) if row["name"] == "onnx")
    assert onnx_row["auto"]["matmulnbits_accuracy_level"] == {"int4": 4, "int8": 4}


def test_a_cache_that_cannot_be_written_keeps_the_choice_for_this_export(tiny_models, monkeypatch, tmp_path):
    """With GPTCLI_HOME full or read-only, `export --output` elsewhere ended with 'cannot write .../cache:
    Read-only file system' after measuring: tuning.json, a cache, failed the export it was measured for."""
    import errno

    import gptcli.export as ex

    def refused(path, data, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(tuning, "write_atomic", refused)
    monkeypatch.setattr(
        nbits_choice,
        "ort_timer",
        lambda threads: fake_timer({(b, lv, r): 0.001 * lv for b in (4, 8) for lv in (1, 4) for r in (1, 8)}, []),
    )
    result = ex.ensure_export(tiny_models["llama"], precision="int8", output=tmp_path / "out")
    assert result.meta["quantization"]["accuracy_level"]["8"] == 1  # the measured choice
    assert not tuning.tuning_file().exists()  # nothing kept: the next export measures again
