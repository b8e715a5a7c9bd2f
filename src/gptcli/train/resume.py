"""What a resume continues: the run's config (with the changes a resume may make) and its latest checkpoint, which
must be this run's own."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gptcli.errors import ConfigError, GptcliError, InputError, ModelError
from gptcli.textio import read_yaml
from gptcli.train import checkpoint as ckpt
from gptcli.train.config import TrainConfig, flat_values, incompatible_changes, load_config
from gptcli.train.errors import RunError
from gptcli.train.step import lr_at

FOREIGN_HINT = "it was copied from another run: move it out of {where} (or resume the run it came from)"
MAY_CHANGE = "only train.max_iters, train.device/threads/compile, eval.* and checkpoint.* may change"


def resumed_config(
    run: Path, data_path: Path | None, preset: str | None, config_file: Path | None, sets: list[str], flags: Any
) -> tuple[TrainConfig, Path, Path]:
    """A run folder's config (with the changes a resume may make), its latest checkpoint and its data."""
    info = ckpt.read_run(run)
    saved_data = info.get("data")
    if data_path is None and not (isinstance(saved_data, str) and saved_data):  # with --data, it is replaced
        raise RunError(f'cannot resume {run}: corrupt {run / ckpt.RUN_FILE} ("data" is not a path)', hint="pass --data")
    try:
        saved = load_config(base=read_yaml(run / ckpt.CONFIG_FILE))
    except GptcliError as exc:
        raise RunError(f"cannot resume {run}: {exc.message}", hint="the run's train_config.yaml is damaged") from None
    cfg = load_config(base=saved.to_dict(), preset=preset, config_file=config_file, sets=sets, flags=flags)
    changed = incompatible_changes(saved, cfg)
    if changed:
        raise RunError(
            f"cannot resume {run} with a different {', '.join(changed)}",
            hint=MAY_CHANGE,
        )
    latest = ckpt.latest_checkpoint(run)
    if latest is None:
        raise RunError(f"cannot resume {run}: it has no complete checkpoint yet", hint="start it again")
    step = latest.name.removeprefix("step-")
    if step.isdigit() and cfg.train.max_iters <= int(step):
        raise ConfigError(
            f"{run} is already at step {int(step)}: train.max_iters (--max-iters) must be above it,"
            f" not {cfg.train.max_iters}",
            hint=f"continue it with e.g. --max-iters {2 * int(step)}",
        )
    if data_path is None and not Path(saved_data).exists():  # moved or deleted since: "check --data" misled
        raise InputError(f"cannot resume {run}: its data {saved_data} is gone", hint="pass --data with where it is now")
    return cfg, latest, data_path or Path(saved_data)


def check_checkpoint(
    run: Path, checkpoint: Path, cfg: TrainConfig, vocab: int, block: int, init: Path | None, tokenizer: bytes
) -> None:
    """The corpus still gives the run's tokenizer, and the checkpoint to resume holds this run's model and tokenizer:
    one copied in from another run (`cp -r other/checkpoints/step-N run/checkpoints/`) was trained on silently,
    whatever its shape (RunError). A tokenizer changed by a hand edit of the run's train_config.yaml (data.tokenizer,
    data.vocab_size) is blamed on that edit, as check_recorded_config names it, not on the corpus."""

    def corpus_changed() -> RunError:
        check_recorded_config(run, checkpoint, cfg, {"config": ckpt.recorded_config(checkpoint)})
        return RunError(f"cannot resume {run}: the corpus gives another tokenizer now", hint="use the same --data")

    foreign = FOREIGN_HINT.format(where=checkpoint.parent)
    own = _read(run / "tokenizer.json")  # each start and resume writes the run's own
    if own is not None and own != tokenizer:
        raise corpus_changed()
    expected = _sizes(
        init
        or {
            "model_type": "gpt2",
            "n_layer": cfg.model.n_layer,
            "n_embd": cfg.model.n_embd,
            "n_head": cfg.model.n_head,
            "vocab_size": vocab,
            "n_positions": block,
        }
    )
    found = _sizes(checkpoint)
    if found is not None and expected is not None and found != expected:
        differ = [key for key in expected if found[key] != expected[key]]

        def listed(sizes: dict[str, Any]) -> str:
            return ", ".join(f"{key} {sizes[key]}" for key in differ)

        if _sizes(run) == found:  # the run's own model is the checkpoint's: its config was edited since
            raise RunError(
                f"cannot resume {run}: its {ckpt.CONFIG_FILE} gives another model ({listed(expected)})"
                f" than the run trained ({listed(found)})",
                hint=f"undo that change to {run / ckpt.CONFIG_FILE}: on a resume {MAY_CHANGE}",
            )
        raise RunError(
            f"cannot resume {run}: {checkpoint} holds another model ({listed(found)})"
            f" than this run's config gives ({listed(expected)})",
            hint=foreign,
        )
    try:
        same = (checkpoint / "tokenizer.json").read_bytes() == tokenizer
    except OSError as exc:
        raise RunError(f"cannot resume {run}: cannot read {checkpoint / 'tokenizer.json'} ({exc})") from None
    if not same and own is None:
        raise corpus_changed()
    if not same:
        raise RunError(f"cannot resume {run}: {checkpoint} holds another tokenizer than this run's", hint=foreign)


def check_recorded_config(run: Path, checkpoint: Path, cfg: TrainConfig, state: dict[str, Any]) -> None:
    """The run's train_config.yaml against the config its checkpoint records (state["config"]): a hand edit of a
    setting the same flag may not change on a resume (train.batch_size, data.*, optim.grad_clip, ...) is refused as
    the flag is (RunError naming the keys, both values and the file). A checkpoint from before gptcli recorded its
    config has none (check_recorded_optimizer, which runs first, still sees what its optimizer state holds)."""
    recorded = state.get("config")
    if not isinstance(recorded, dict):
        return
    changed = incompatible_changes(recorded, cfg)
    if changed:
        given, trained = flat_values(cfg.to_dict()), flat_values(recorded)
        raise RunError(
            f"cannot resume {run}: its {ckpt.CONFIG_FILE} gives {_listed(changed, given, named=True)}, but the run"
            f" trained with {_listed(changed, trained, named=False)} ({checkpoint.name} records it)",
            hint=_undo_edit(run),
        )


def _undo_edit(run: Path) -> str:
    """The hint for a hand edit of the run's config that a resume refuses."""
    config = run / ckpt.CONFIG_FILE
    return f"undo that change to {config}, or start a new run with it (a new --out): on a resume {MAY_CHANGE}"


def _listed(keys: list[str], values: dict[str, Any], *, named: bool) -> str:
    """'train.batch_size 8 and optim.grad_clip 0.5' (named), or '4 and 1' (not): values as the YAML file writes them."""
    shown = [_yaml_value(values.get(key)) for key in keys]
    parts = [f"{key} {value}" for key, value in zip(keys, shown, strict=True)] if named else shown
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_recorded_optimizer(run: Path, checkpoint: Path, cfg: TrainConfig, state: dict[str, Any]) -> None:
    """The optimizer settings the run's train_config.yaml gives against those its checkpoint's optimizer state
    records: a hand edit of optim.* that the same flags could not make (RunError naming the key and the file).

    The state records the betas, the weight decay and the learning rate of the last step (the schedule's:
    optim.lr, min_lr, warmup_iters, lr_decay_iters, decay_lr); check_recorded_config sees the rest where the
    checkpoint records its config."""
    optim, step = cfg.optim, state["step"]
    try:
        group = state["optimizer"]["param_groups"][0]  # the decayed parameters' (the other's decay is 0)
        recorded = {
            "optim.beta1": (optim.beta1, float(group["betas"][0])),
            "optim.beta2": (optim.beta2, float(group["betas"][1])),
            "optim.weight_decay": (optim.weight_decay, float(group["weight_decay"])),
            "learning rate": (lr_at(step - 1, cfg) if step else optim.lr, float(group["lr"])),
        }
    except (KeyError, IndexError, TypeError, ValueError):  # not the optimizer state gptcli writes: nothing to tell
        return
    for key, (given, trained) in recorded.items():
        if not math.isclose(given, trained, rel_tol=1e-6, abs_tol=1e-12):
            what = (
                f"a learning rate of {given:g} at step {step} (optim.lr, min_lr, warmup_iters, lr_decay_iters and"
                " decay_lr give it)"
                if key == "learning rate"
                else f"{key} {given:g}"
            )
            raise RunError(
                f"cannot resume {run}: its {ckpt.CONFIG_FILE} gives {what}, but the run trained with {trained:g}"
                f" ({checkpoint.name} records it)",
                hint=_undo_edit(run),
            )


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _sizes(model: Path | dict[str, Any]) -> dict[str, Any] | None:
    """What a resume must find unchanged in a model's config.json (a folder's, or a dict like one); None when
    it does not read (a damaged checkpoint: the resume says so, or falls back to an older one)."""
    from gptcli.hf.architecture import Architecture
    from gptcli.hf.files import read_config

    try:
        config = read_config(model) if isinstance(model, Path) else model
        if not isinstance(config.get("model_type"), str):
            return None
        arch = Architecture.from_config(config)
    except ModelError:
        return None
    return {
        "model type": arch.model_type,
        "layers": arch.layers,
        "width": arch.hidden,
        "heads": arch.heads,
        "vocabulary": arch.vocab,
        "context": arch.context,
    }
