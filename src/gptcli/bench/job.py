"""One benchmark job: what a single configuration runs, typed, and its JSON form for a worker process."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from gptcli.bench.spec import MicroTest
from gptcli.config import SamplingConfig, Settings

MODES = ("micro", "latency", "train")


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    data = asdict(settings)
    data["sampling"]["stop"] = list(settings.sampling.stop)
    return data


def settings_from_dict(data: dict[str, Any]) -> Settings:
    sampling = dict(data.get("sampling", {}))
    sampling["stop"] = tuple(sampling.get("stop", ()))
    return Settings(**{**data, "sampling": SamplingConfig(**sampling)})


@dataclass(frozen=True)
class Job:
    """A configuration's work: load once (micro, latency) or build the model (train), then time it.

    `settings` carry the backend, precision, threads and device of the configuration; the mode
    decides which of the other fields matter (tests for micro; prompts and sampling for latency;
    train_config and peak_tflops for train).
    """

    mode: str
    model_name: str
    reps: int
    settings: Settings = field(default_factory=Settings)
    model_path: str | None = None
    tests: tuple[MicroTest, ...] = ()
    prompts: tuple[str, ...] = ()
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    remeasure: bool = False  # measure the memory bandwidth again instead of reading the cache
    honours_precision: bool = True  # False: the backend ignores --precision (torch: --dtype decides)
    train_config: dict[str, Any] | None = None  # TrainConfig.to_dict()
    peak_tflops: float | None = None
    warmup: bool = True
    warmup_iters: int = 2
    prepare_only: bool = False  # only the one-time work (an export, a conversion): no timing
    isolated: bool = False  # run in its own worker process
    quiet: bool = False  # `gptcli -q bench`: a worker says its warnings only, not its progress

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["settings"] = settings_to_dict(self.settings)
        data["tests"] = [t.as_dict() for t in self.tests]
        data["prompts"] = list(self.prompts)
        data["sampling"] = {**asdict(self.sampling), "stop": list(self.sampling.stop)}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Job:
        data = json.loads(text)
        sampling = data.get("sampling") or {}
        return cls(
            **{
                **data,
                "settings": settings_from_dict(data.get("settings") or {}),
                "tests": tuple(MicroTest(**t) for t in data.get("tests") or ()),
                "prompts": tuple(data.get("prompts") or ()),
                "sampling": SamplingConfig(**{**sampling, "stop": tuple(sampling.get("stop", ()))}),
            }
        )
