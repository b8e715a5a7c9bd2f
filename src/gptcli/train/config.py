"""The training config: frozen dataclasses filled from a preset, a YAML file, `--set` and flags.

Precedence, lowest first: dataclass defaults < ``--preset`` < ``--config FILE`` < ``--set a.b=c`` <
dedicated flags (``--lr``, ``--max-iters`` …). Unknown keys fail with the key path and a suggestion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from gptcli.coercion import coerce_value, suggest
from gptcli.config import MAX_THREADS, field_types, flatten
from gptcli.errors import ConfigError
from gptcli.textio import read_yaml


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-2-family architecture (ignored with --init, which brings its own)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    tokenizer: str = "char"  # char | bpe | init (the --init model's tokenizer)
    vocab_size: int = 8000  # for bpe
    val_fraction: float = 0.1
    dedup_lines: bool = False


@dataclass(frozen=True)
class LoopConfig:
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA when supported) | float32 | bfloat16 | float16
    compile: bool = False
    threads: int | None = None


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    decay_lr: bool = True
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class EvalConfig:
    interval: int = 250
    iters: int = 20
    sample_tokens: int = 200
    sample_prompt: str = "\n"


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 250
    keep_last: int = 2


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: str | None = None  # a model to fine-tune instead of a fresh GPT-2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Settings that may change when a run is resumed: everything else must match the run's config.
MIN_LR_RATIO = 10  # optim.min_lr = optim.lr / this when only the learning rate is given (nanoGPT, Chinchilla)
RESUMABLE_CHANGES = ("train.max_iters", "train.device", "train.threads", "train.compile", "eval.", "checkpoint.")
# Upper bounds no real run on one machine reaches: past them a value is a typo, and torch or the BPE
# trainer would fail with an overflow (or try to allocate it) instead of a one-line error.
MAX_BATCH_SIZE = 1 << 16  # train.batch_size: sequences per micro-batch
MAX_GRAD_ACCUM = 1 << 16  # train.grad_accum: micro-batches per step
MAX_BLOCK_SIZE = 1 << 20  # model.block_size: tokens of context (1 Mi)
MAX_LAYERS = 1 << 10  # model.n_layer
MAX_EMBD = 1 << 16  # model.n_embd
MAX_HEADS = 1 << 10  # model.n_head
MAX_VOCAB = 1 << 21  # data.vocab_size (2 Mi tokens; real vocabularies stay under 300k)
MAX_ITERS = 10**12  # train.max_iters and the other step counts: a typo's 30 digits is refused, not run
MAX_EVAL_ITERS = 100_000  # eval.iters: batches per evaluation (nanoGPT uses 200); each eval runs them all
CHOICES = {
    "data.tokenizer": ("char", "bpe", "init"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "float32", "bfloat16", "float16"),
}


def preset_names() -> list[str]:
    folder = resources.files("gptcli.train") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    names = preset_names()
    if name not in names:
        raise ConfigError(
            f"unknown preset '{name}'{suggest(name, names)}",
            hint=f"presets: {', '.join(names)}; or a config file (train --config, bench --train-config)",
        )
    return Path(str(resources.files("gptcli.train") / "presets" / f"{name}.yaml"))


def _coerce(key: str, kind: Any, value: Any, where: str) -> Any:
    return coerce_value(key, kind, value, where, choices=CHOICES.get(key, ()))


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set a.b=c` strings → dotted keys; values are YAML scalars (`3e-4`, `true`, `null`)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        parts = dotted.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def build(flat: Mapping[str, Any], where: Mapping[str, str], *, min_lr_follows: bool = False) -> TrainConfig:
    """Dotted values (already checked for unknown keys) → a validated TrainConfig.

    `min_lr_follows`: optim.min_lr becomes optim.lr / MIN_LR_RATIO (nanoGPT's ratio)."""
    top = field_types(TrainConfig)
    cfg = TrainConfig()
    for key, value in flat.items():
        section, _, sub = key.partition(".")
        if sub:
            part = getattr(cfg, section)
            kind = field_types(type(part))[sub]
            cfg = replace(cfg, **{section: replace(part, **{sub: _coerce(key, kind, value, where[key])})})
        else:
            cfg = replace(cfg, **{key: _coerce(key, top[key], value, where[key])})
    if min_lr_follows:
        cfg = replace(cfg, optim=replace(cfg.optim, min_lr=float(f"{cfg.optim.lr / MIN_LR_RATIO:.12g}")))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    m, t, o = cfg.model, cfg.train, cfg.optim
    bounded = [
        ("model.n_layer", m.n_layer, 1, MAX_LAYERS),
        ("model.n_head", m.n_head, 1, MAX_HEADS),
        ("model.n_embd", m.n_embd, 1, MAX_EMBD),
        ("model.block_size", m.block_size, 2, MAX_BLOCK_SIZE),
        ("data.vocab_size (--vocab-size)", cfg.data.vocab_size, 64, MAX_VOCAB),
        ("train.batch_size (--batch-size)", t.batch_size, 1, MAX_BATCH_SIZE),
        ("train.grad_accum (--grad-accum)", t.grad_accum, 1, MAX_GRAD_ACCUM),
        ("train.max_iters (--max-iters)", t.max_iters, 1, MAX_ITERS),
        ("optim.warmup_iters", o.warmup_iters, 0, MAX_ITERS),
        ("optim.lr_decay_iters", o.lr_decay_iters, 1, MAX_ITERS),
        ("eval.interval", cfg.eval.interval, 1, MAX_ITERS),
        ("eval.iters", cfg.eval.iters, 1, MAX_EVAL_ITERS),
        ("checkpoint.interval", cfg.checkpoint.interval, 1, MAX_ITERS),
    ]
    for name, value, low, high in bounded:
        if not low <= value <= high:
            raise ConfigError(f"{name} must be in {low}..{high:,}, not {_short(value)}")
    checks = [
        (m.n_embd % m.n_head == 0, "model.n_embd must be a multiple of model.n_head"),
        (0 <= m.dropout < 1, "model.dropout must be in [0, 1)"),
        (0 < cfg.data.val_fraction < 1, "data.val_fraction must be in (0, 1)"),
        (
            0 <= o.beta1 < 1 and 0 <= o.beta2 < 1,
            f"optim.beta1 and optim.beta2 must be in [0, 1) (beta1 {o.beta1:g}, beta2 {o.beta2:g})",
        ),
        (0 <= t.seed < 2**63, f"train.seed (--seed) must be in [0, 2**63), not {t.seed}"),
        (t.threads is None or 1 <= t.threads <= MAX_THREADS, f"train.threads must be in 1..{MAX_THREADS}"),
        (
            o.lr > 0 and 0 <= o.min_lr <= o.lr,
            f"optim.lr must be > 0 and optim.min_lr in [0, lr] (lr {o.lr:g}, min_lr {o.min_lr:g})",
        ),
        (o.grad_clip >= 0 and o.weight_decay >= 0, "optim.grad_clip and optim.weight_decay must be >= 0"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
        (cfg.data.tokenizer != "init" or cfg.init, "data.tokenizer 'init' needs --init MODEL"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _short(value: int) -> str:
    """A number for a message: a huge one by its size, not its hundred digits."""
    text = str(value)
    return text if len(text) <= 15 else f"a {len(text)}-digit number"


def load_config(
    *,
    preset: str | None = None,
    config_file: Path | None = None,
    sets: list[str] | None = None,
    flags: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Resolve every layer into one TrainConfig. `base` (a saved run's config) goes under the rest."""
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    rank: dict[str, int] = {}  # each source's place, lowest first

    def layer(data: Mapping[str, Any], source: str, nested: bool = True) -> None:
        values = flatten(data if nested else _nest(data), TrainConfig, source)
        flat.update(values)
        where.update(dict.fromkeys(values, source))
        rank[source] = len(rank)

    if base is not None:
        layer(base, "the run's train_config.yaml")
    if preset is not None:
        layer(read_yaml(preset_path(preset)), f"preset {preset}")
    if config_file is not None:
        layer(read_yaml(config_file), str(config_file))
    if sets:
        layer(parse_set(sets), "--set", nested=False)
    if flags:
        layer({k: v for k, v in flags.items() if v is not None}, "flag", nested=False)
    lr_from, min_lr_from = where.get("optim.lr"), where.get("optim.min_lr")
    # A learning rate given above the file that set min_lr (a preset's) brings its own floor, a tenth of
    # it; a min_lr given on the command line (--set) is kept.
    min_lr_follows = lr_from is not None and (
        min_lr_from is None or (min_lr_from != "--set" and rank[min_lr_from] < rank[lr_from])
    )
    return build(flat, where, min_lr_follows=min_lr_follows)


def incompatible_changes(saved: TrainConfig | Mapping[str, Any], new: TrainConfig) -> list[str]:
    """Dotted keys whose change would make a resumed run a different run. `saved` may be the config a checkpoint
    records (TrainConfig.to_dict() of its run): keys it lacks are not compared."""
    old_flat = flat_values(saved if isinstance(saved, Mapping) else saved.to_dict())
    new_flat = flat_values(new.to_dict())
    return [
        key
        for key in old_flat
        if old_flat[key] != new_flat.get(key) and not any(key.startswith(p) for p in RESUMABLE_CHANGES)
    ]


def flat_values(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys: {"optim": {"lr": 1e-3}} → {"optim.lr": 1e-3}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flat_values(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
