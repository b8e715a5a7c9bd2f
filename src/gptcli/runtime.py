"""Open a model for a command: resolve the reference, pick and load the backend, load the tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptcli.backends.base import (
    Backend,
    LoadOptions,
    blamed,
    blaming,
    chosen_name,
    get_backend_class,
    unavailable_reason,
)
from gptcli.config import Settings
from gptcli.errors import BackendError, MemoryShortError, UsageError
from gptcli.gguf_convert import Progress
from gptcli.hardware import loadable_memory_bytes, usable_cpus
from gptcli.models import LocalModel, is_onnx_export, resolve_model
from gptcli.textio import human_bytes
from gptcli.tokenizer import Tokenizer, read_chat_template


@dataclass
class Runtime:
    model: LocalModel
    backend: Backend
    tokenizer: Tokenizer

    @property
    def backend_name(self) -> str:
        """The backend as the user chose it (`--backend x`), not what its class calls itself."""
        return chosen_name(self.backend)


def check_backend(settings: Settings) -> type[Backend]:
    """Fail early (exit 4) when the backend is unknown or cannot run here, before any loading."""
    backend_cls = get_backend_class(settings.backend)
    who, _ = blamed(backend_cls)
    reason = unavailable_reason(backend_cls, who, settings.device)
    if reason:
        raise BackendError(f"{who} cannot run here: {reason}", hint="`gptcli backends` lists what can run here")
    return backend_cls


def load_options(settings: Settings) -> LoadOptions:
    return LoadOptions(
        device=settings.device,
        dtype=settings.dtype,
        precision=settings.precision,
        threads=settings.threads,
        allow_pickle=settings.allow_pickle,
        trust_remote_code=settings.trust_remote_code,
    )


def load_backend(
    backend_cls: type[Backend], settings: Settings, folder: Path, notify: Callable[[str], None] | None = None
) -> Backend:
    """Load `folder` with the chosen backend; a plugin that raises anything but a GptcliError is a
    BackendError naming it (a built-in's own failure stays an internal error: a bug to report). `notify` hears
    the load's progress (an ONNX export's steps), as the caller shows it (`-q` hides it)."""
    options = load_options(settings)
    if notify is not None:
        options.extra["notify"] = notify
    check_memory(backend_cls, folder, options)
    with blaming(backend_cls, f"to load {folder.name}"):
        backend = backend_cls.load(folder, options)
    return backend


def open_model(settings: Settings, notify: Callable[[str], None], progress: Progress | None = None) -> LocalModel:
    """The settings' model as a local folder; `progress` hears how a first-use conversion is getting on."""
    return resolve_model(settings.model, allow_pickle=settings.allow_pickle, notify=notify, progress=progress)


def open_runtime(settings: Settings, notify: Callable[[str], None], progress: Progress | None = None) -> Runtime:
    """The settings' model, backend and tokenizer; `settings.chat_template` (a file, checked before the model
    is opened) is the tokenizer's chat template in place of the model's own, for every prompt built over it."""
    backend_cls = check_backend(settings)
    given = read_chat_template(Path(settings.chat_template).expanduser()) if settings.chat_template else None
    model = open_model(settings, notify, progress)
    if is_onnx_export(model.path) and settings.backend != "onnx":
        raise UsageError(f"{model.path} is an ONNX export", hint="run it with --backend onnx")
    cpus = usable_cpus()
    if settings.threads is not None and settings.threads > cpus:
        notify(
            f"warning: --threads {settings.threads} is more than the {cpus} CPUs here: sharing cores slows every step"
        )
    tokenizer = Tokenizer(model.path, given)
    if settings.sampling.constraint is not None:  # a grammar that compiles only with the vocabulary fails here,
        from gptcli.constraints import prepare  # before the model loads (the tokenizer-free check let it pass)

        prepare(settings.sampling.constraint, tokenizer, settings.sampling.constraint.where)  # named as the flag's
    backend = load_backend(backend_cls, settings, model.path, notify)
    if getattr(backend, "fallback_reason", None):  # a slower engine runs: say why
        notify(f"{chosen_name(backend)}: {backend.fallback_reason}")
    return Runtime(model, backend, tokenizer)


def check_memory(backend_cls: type[Backend], folder: Path, options: LoadOptions) -> None:
    """Refuse, before loading, a model whose weights alone (the backend's `memory_floor`) are more than the memory
    left (RAM and swap, within a container's limit), as ollama does: the load would end in the kernel's kill
    (exit 137) minutes later, without a word."""
    floor_of = getattr(backend_cls, "memory_floor", None)  # optional: a plugin's memory is its own to judge
    if floor_of is None:
        return
    floor = floor_of(folder, options)
    if floor is None or (room := loadable_memory_bytes()) is None or floor.bytes <= room:
        return
    raise MemoryShortError(
        f"{folder.name}'s {floor.params:,} parameters need at least {human_bytes(floor.bytes)} of memory as"
        f" {floor.held_as}, but {human_bytes(room)} is free here",
        hint=floor.hint,
    )
