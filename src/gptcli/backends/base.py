"""The Backend protocol, the facts a backend reports about its model, and the backend registry.

A backend loads a model folder, makes an empty cache, and runs ``forward(ids, cache)``: the logits of
the last position (float32, shape ``[vocab]``) plus the cache grown by ``len(ids)``. ``step(batch)``
advances several sequences at once, each ``(ids, cache)`` with its own cache: a native batched step
sends all their tokens through the dense layers together (each weight is read once per step) while
attention runs per sequence; `batched_step` gives every backend without one a correct default that
loops over `forward`. It never samples, prints or reads config. Built-ins register first; third-party
packages add backends through the ``gptcli.backends`` entry-point group, and only the selected backend
is ever imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from gptcli.backends.plugin_discovery import PLUGINS_ENV, plugin_entry_points, plugin_filter
from gptcli.errors import BackendError, GptcliError, ModelError, clipped

if TYPE_CHECKING:  # numpy only types the protocol: listing backends (shell completion) stays light
    import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """What the decoding loop and the CLI need to know about a loaded model."""

    name: str
    architecture: str
    context_length: int
    vocab_size: int
    num_layers: int
    params: int
    dtype: str
    device: str
    kv_bytes_per_token: int = 0  # KV cache bytes one position costs (0: unknown, the engine estimates)


@dataclass(frozen=True)
class LoadOptions:
    """How to load: device, dtype, threads and the two opt-in safety switches."""

    device: str = "auto"
    dtype: str = "auto"
    precision: str = "fp32"  # for backends that run exported/quantized graphs (onnx): fp32|fp16|int8|int4
    threads: int | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Cache(Protocol):
    """A backend's KV cache: opaque to the loop except for how many positions it holds."""

    @property
    def length(self) -> int: ...


@runtime_checkable
class Backend(Protocol):
    """The protocol every backend implements (built-in or plugin)."""

    name: ClassVar[str]
    info: ModelInfo

    @classmethod
    def unavailable_reason(cls, device: str = "auto") -> str | None:
        """None when this backend can run here on `device`, else a one-line reason."""
        ...

    @classmethod
    def load(cls, folder: Path, options: LoadOptions) -> Backend: ...

    def new_cache(self) -> Cache: ...

    def forward(self, ids: Sequence[int], cache: Cache) -> tuple[np.ndarray, Cache]:
        """Run ids after what the cache holds; return last-position float32 logits and the grown cache."""
        ...

    def truncate(self, cache: Cache, length: int) -> Cache:
        """Drop cached positions past `length` (for reusing a shared prefix)."""
        ...

    # Optional (found with getattr, so plugins need neither):
    #   step(batch: Sequence[tuple[Sequence[int], Cache]]) -> tuple[np.ndarray, list[Cache]]
    #       logits [B, vocab] float32 of each entry's last position; entry i's cache grown by len(ids_i).
    #       Entries may mix prefill chunks (many ids) and decode tokens (one id). Batching must not change
    #       answers: row i equals forward(ids_i, cache_i) (fp32, within 1e-4).
    #   release(cache) -> None
    #       the engine is done with this cache: free or recycle its memory now.
    #   score(ids: Sequence[int], cache) -> tuple[np.ndarray, Cache]
    #       logits [len(ids), vocab] float32 of EVERY position of ids, in one pass (scoring a text);
    #       the cache grows by len(ids). Row j equals forward(ids[j:j+1]) after ids[:j] (fp32, within 1e-4).
    #   fork(cache, length) -> Cache
    #       a new cache holding a copy of the first `length` positions of `cache` (which is left as it is):
    #       the server's prefix cache gives one prefix to several sequences at once.


def batched_step(backend: Backend, batch: Sequence[tuple[Sequence[int], Cache]]) -> tuple[np.ndarray, list[Cache]]:
    """One step over several sequences: the backend's native `step`, or a loop over `forward`."""
    import numpy as np

    if not batch:
        raise ValueError("batched_step() needs at least one sequence")
    native = getattr(backend, "step", None)
    if native is not None:
        with blaming(backend, "in step()"):
            logits, caches = native(batch)
        return checked_logits(backend, logits, len(batch), "step()"), checked_caches(backend, caches, len(batch))
    rows, caches = [], []
    for ids, cache in batch:
        with blaming(backend, "in forward()"):
            logits, cache = backend.forward(ids, cache)
        rows.append(checked_logits(backend, logits, None, "forward()"))
        caches.append(cache)
    return np.stack(rows), caches


def checked_logits(backend: Backend, logits: Any, rows: int | None, call: str) -> np.ndarray:
    """`logits` when they are what the protocol promises ([rows, vocab], or [vocab] when rows is None, no NaN);
    else a BackendError naming the backend: a wrong shape or NaN would be sampled into a wrong answer or fail
    deep in sampling."""
    import numpy as np

    vocab = backend.info.vocab_size
    want = (vocab,) if rows is None else (rows, vocab)
    who, hint = blamed(backend)
    shape = getattr(logits, "shape", None)
    if shape != want:
        got = f"logits of shape {tuple(shape)}" if shape is not None else f"{type(logits).__name__} for logits"
        axes = "(vocabulary,)" if rows is None else "(rows, vocabulary)"
        raise BackendError(f"{who}: {call} gave {got}, not {want} {axes}", hint=hint)
    if np.isnan(logits).any():
        if hint is not None:  # a plugin's NaN is the plugin's to answer for
            raise BackendError(f"{who}: {call} gave NaN logits", hint=hint)
        # A built-in backend's NaN is the model's (damaged weights, or an overflow at this precision), as in eval.
        raise ModelError(
            f"the model gives NaN logits ({who}, {call})",
            hint="try --dtype float32 (--precision fp32 on onnx); if NaN again, the weights are damaged",
        )
    return logits


def checked_caches(backend: Backend, caches: Sequence[Cache], rows: int) -> list[Cache]:
    """The caches a step gave, one per entry of its batch (else a BackendError naming the backend)."""
    if len(caches) != rows:
        who, hint = blamed(backend)
        raise BackendError(f"{who}: step() gave {len(caches)} caches for {rows} rows", hint=hint)
    return list(caches)


@contextlib.contextmanager
def blaming(backend: Backend | type[Backend], doing: str) -> Iterator[None]:
    """A plugin's own exception while `doing` ("in forward()", "to load X") becomes a BackendError naming it
    (not 'internal error', which says gptcli has a bug); a built-in's stays as it is, and so does a GptcliError
    (a prompt past the context)."""
    try:
        yield
    except GptcliError:
        raise
    except Exception as exc:
        who, hint = blamed(backend)
        if hint is None:
            raise
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        raise BackendError(f"{who} failed {doing}: {message}", hint=hint) from None


def chosen_name(backend: Backend | type[Backend]) -> str:
    """The name a backend was chosen by (`--backend x`, its entry point's name), as every output names it."""
    spec = registered_spec(backend)
    if spec is not None:
        return spec.name
    return getattr(backend, "name", None) or (backend if isinstance(backend, type) else type(backend)).__name__


def blamed(backend: Backend | type[Backend]) -> tuple[str, str | None]:
    """How an error names `backend` (a loaded one or its class), and its hint (a plugin's: reinstall or remove
    it): by the name it was chosen by (`--backend x`, its entry point's name) and the distribution it came
    from, not by what its class calls itself."""
    spec = registered_spec(backend)
    if spec is None:  # a backend made without the registry (a test's, an embedding program's)
        name = chosen_name(backend)
        return f"backend '{name}'", (None if name in BUILTINS else PLUGIN_HINT)
    where = f" ({spec.origin})" if spec.distribution is not None else ""
    return f"backend '{spec.name}'{where}", (None if spec.origin == "built-in" else PLUGIN_HINT)


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """A ModelError when a tokenizer gave an id past the model's embeddings (a token added to tokenizer.json
    without resizing them), before it becomes an IndexError deep in a step."""
    if len(ids) and (top := int(max(ids))) >= vocab_size:
        raise ModelError(
            f"the tokenizer gives token id {top}, past the model's {vocab_size} embeddings",
            hint="the model's tokenizer does not match its weights: resize its embeddings, or use another model",
        )


def score_positions(backend: Backend, ids: Sequence[int], cache: Cache) -> tuple[np.ndarray, Cache]:
    """Logits [len(ids), vocab] of every position of ids: the backend's native `score`, or one forward per token.

    The caller bounds len(ids): the result holds len(ids) x vocab floats."""
    import numpy as np

    if len(ids) == 0:
        raise ValueError("score_positions() needs at least one token")
    native = getattr(backend, "score", None)
    if native is not None:
        with blaming(backend, "in score()"):
            logits, cache = native(ids, cache)
        return checked_logits(backend, logits, len(ids), "score()"), cache
    rows = []
    for token in ids:
        with blaming(backend, "in forward()"):
            logits, cache = backend.forward([token], cache)
        rows.append(checked_logits(backend, logits, None, "forward()"))
    return np.stack(rows), cache


def fork_of(backend: Backend) -> Callable[[Cache, int], Cache] | None:
    """The backend's `fork` (copy a cache's first positions into a new cache), or None when it has none."""
    return getattr(backend, "fork", None)


def release_cache(backend: Backend, cache: Cache) -> None:
    """Hand a finished sequence's cache back to the backend (a no-op for backends without `release`)."""
    release = getattr(backend, "release", None)
    if release is not None:
        release(cache)


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend: where it comes from and how to import it (lazily, only when chosen)."""

    name: str
    target: str  # "module:Class"
    origin: str  # "built-in", "GPTCLI_BACKEND_PATHS" or "<distribution> <version>"
    conflict: str | None = None
    distribution: str | None = None  # plugins only
    version: str | None = None

    def load_class(self) -> type[Backend]:
        if self.conflict:
            raise BackendError(self.conflict, hint="uninstall the plugin or rename its entry point")
        module_name, _, attr = self.target.partition(":")
        hint = PATHS_HINT if self.origin == PATHS_VARIABLE else PLUGIN_HINT  # the variable named what did not load
        try:
            with contextlib.redirect_stdout(sys.stderr):  # a plugin's prints must not mix into stdout (--json)
                module = importlib.import_module(module_name)
            loaded = getattr(module, attr)
        except (Exception, SystemExit) as exc:  # a broken plugin (even one that exits) must not take gptcli down
            raise BackendError(
                f"backend '{self.name}' ({self.origin}) failed to load: {type(exc).__name__}: {exc}", hint=hint
            ) from None
        missing = [name for name in ("load", "unavailable_reason") if not callable(getattr(loaded, name, None))]
        if not isinstance(loaded, type) or missing:
            what = f"{self.target} is not a backend class" + (f" (no {', '.join(missing)})" if missing else "")
            raise BackendError(f"backend '{self.name}' ({self.origin}): {what}", hint=hint)
        _CHOSEN_AS[loaded] = self
        return loaded


# Each backend class the registry handed out, with the entry it was chosen by (errors name that entry).
_CHOSEN_AS: dict[type, BackendSpec] = {}


def registered_spec(backend: Backend | type[Backend]) -> BackendSpec | None:
    """The registry entry a backend (or its class, or a class it derives from) was loaded by; None if none."""
    cls = backend if isinstance(backend, type) else type(backend)
    return next((_CHOSEN_AS[c] for c in cls.__mro__ if c in _CHOSEN_AS), None)


PLUGIN_HINT = "reinstall or remove the plugin; `gptcli backends` lists every backend"
PATHS_VARIABLE = "GPTCLI_BACKEND_PATHS"  # name=module:Class,... : backends from importable modules, no install
PATHS_HINT = f"check {PATHS_VARIABLE} (name=module:Class, its module importable); `gptcli backends` lists them all"


def unavailable_reason(backend: type[Backend], who: str, device: str) -> str | None:
    """Why `backend` cannot run on `device` here (None: it can). A plugin's broken answer (an exception, a value
    that is not a string) is a BackendError naming `who` (e.g. "backend 'x' (its origin)"), not an internal error."""
    hint = PLUGIN_HINT
    try:
        with contextlib.redirect_stdout(sys.stderr):
            reason = backend.unavailable_reason(device)
    except (Exception, SystemExit) as exc:
        raise BackendError(f"{who} failed in unavailable_reason(): {type(exc).__name__}: {exc}", hint=hint) from None
    if reason is not None and not isinstance(reason, str):
        raise BackendError(f"{who}: unavailable_reason() gave {reason!r:.60}, not a string or None", hint=hint)
    return reason or None


BUILTINS = {
    "torch": "gptcli.backends.torch_backend:TorchBackend",
    "onnx": "gptcli.backends.onnx_backend:OnnxBackend",
}


def _builtin_spec(name: str) -> BackendSpec | None:
    """The built-in backend `name` when its module is installed, else None."""
    target = BUILTINS.get(name)
    if target is None or importlib.util.find_spec(target.split(":")[0]) is None:
        return None
    return BackendSpec(name, target, "built-in")


def list_backends() -> list[BackendSpec]:
    """Built-ins first, then plugins from entry points. Imports no backend module.

    A plugin claiming a built-in name (or one another plugin already took) is listed as a conflict
    and never loaded; plugins left out by GPTCLI_PLUGINS are not listed at all.
    """
    specs = [spec for spec in map(_builtin_spec, BUILTINS) if spec is not None]
    # GPTCLI_BACKEND_PATHS="name=module:Class,..." registers backends from importable modules
    # without packaging them (for trying out a backend, and for tests).
    for item in filter(None, os.environ.get(PATHS_VARIABLE, "").split(",")):
        name, _, target = item.partition("=")
        specs.append(BackendSpec(name.strip(), target.strip(), PATHS_VARIABLE))
    allowed = plugin_filter()
    for ep in plugin_entry_points():
        if allowed is not None and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        dist_name, version = (dist.name, dist.version) if dist is not None else (None, None)
        origin = f"{dist_name} {version}" if dist is not None else "plugin"
        conflict = None
        taken = next((s for s in specs if s.name == ep.name and not s.conflict), None)
        if taken is not None:
            owner = "the built-in backend" if taken.origin == "built-in" else f"the backend from {taken.origin}"
            conflict = f"plugin {origin} claims the name '{ep.name}' of {owner}; it is ignored"
        specs.append(BackendSpec(ep.name, ep.value, origin, conflict, dist_name, version))
    return specs


def get_backend_class(name: str) -> type[Backend]:
    """Import and return only the selected backend's class."""
    builtin = _builtin_spec(name)
    if builtin is not None:
        # What list_backends would choose (built-ins come first and win every conflict), without
        # reading every installed distribution's entry points (~8 ms of each start).
        return builtin.load_class()
    specs = list_backends()
    chosen = [s for s in specs if s.name == name and not s.conflict]
    if not chosen:
        if any(ep.name == name for ep in plugin_entry_points()):
            raise BackendError(
                f"backend '{name}' is a plugin turned off by {PLUGINS_ENV}={os.environ.get(PLUGINS_ENV, '')}",
                hint=f"add '{name}' to {PLUGINS_ENV}, or unset it",
            )
        from gptcli.coercion import suggest

        names = sorted({s.name for s in specs if not s.conflict})
        raise BackendError(
            f"unknown backend {clipped(repr(name))}{suggest(name, names)}", hint=f"choose one of: {', '.join(names)}"
        )
    return chosen[0].load_class()


def backend_names() -> list[str]:
    """The names `--backend` accepts here (for shell completion: reads entry points, imports no backend)."""
    return list(dict.fromkeys(s.name for s in list_backends() if not s.conflict))
