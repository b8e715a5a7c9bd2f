"""A GGUF file → a plain fp32 safetensors model folder, once, with its progress reported as it goes.

The conversion takes ~12 s for the default model on 2 cores (most of it in transformers' GGUF reader: one
parse of the file's metadata, ~2.5 s, and the dequantization of its weights), so it says which step it is in
through a `progress(stage, done, total, detail)` callback; the caller draws it (a bar in a terminal,
plain lines in a log).
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from gptcli.atomicio import apply_umask, disk_full, publish_dir, temp_dir_beside
from gptcli.errors import ModelError
from gptcli.gguf_header import DAMAGED, GGUFHeader, check_gguf_file
from gptcli.hf import SIZE_KEYS, Architecture, ImpossibleValue, config_key, has_source, layers_held, write_source

Notify = Callable[[str], None]
# (stage, steps done, steps in all, the step under way): the shape `cli.render.StageProgress` draws.
Progress = Callable[[str, int, int | None, str], None]
STEPS = (
    "loading transformers",
    "reading the tokenizer",
    "reading the weights",
    "checking the conversion",
    "writing safetensors",
)


def _ignore(_: str) -> None:
    pass


@contextmanager
def _no_tqdm_bar() -> Iterator[None]:
    """Without the tqdm bar transformers' GGUF reader draws on stderr: in a terminal it fights ours, in a log it
    is carriage-return spam. (TQDM_DISABLE works only before tqdm is imported, and importing torch imports it.)"""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # another transformers: its bar, if any, stays
        yield
        return
    drawn = reader.__dict__.get("tqdm")
    reader.tqdm = lambda iterable, *args, **kwargs: iterable  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if drawn is None:
            del reader.tqdm
        else:
            reader.tqdm = drawn  # type: ignore[attr-defined]


@contextmanager
def _one_tensor_name_map() -> Iterator[None]:
    """transformers' GGUF reader asks gguf for the tensor-name map once per module of the model (397 times for
    the default model, each built anew: ~5 s of the read); the same (architecture, layers) gets the same map."""
    try:
        import gguf
    except ImportError:
        yield
        return
    built = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(built)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = built


@contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """transformers parses a GGUF anew (gguf.GGUFReader, ~2.5 s for the default model: 49,152 vocabulary strings
    read one by one) for the tokenizer, for the config and for the weights; the same file gets the one reader."""
    try:
        import gguf
    except ImportError:
        yield
        return
    built = gguf.GGUFReader
    readers: dict[tuple[Path, str], object] = {}

    def reader(path: str | Path, mode: str = "r") -> object:
        key = (Path(path).resolve(), mode)
        if key not in readers:
            readers[key] = built(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = built
        readers.clear()  # the reader maps the whole file


def _config_names(architecture: str) -> Mapping[str, object]:
    """transformers' names for a GGUF architecture's header keys (`context_length` -> `max_position_embeddings`);
    its own spelling of the architecture may differ (`qwen2moe` is its `qwen2_moe`)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    plain = architecture.replace("-", "").replace("_", "")
    return next((names for name, names in GGUF_CONFIG_MAPPING.items() if name.replace("_", "") == plain), {})


def check_gguf_sizes(path: Path, header: GGUFHeader) -> None:
    """The config.json size checks (hf.Architecture) on the values a GGUF's header gives, under the names
    transformers gives them, before it builds anything from them: it built 4,000,000,000 layers one by one until
    memory ran out, and converted and cached a context_length of 0 (whose error then blamed gptcli's copy).

    Only what the header gives is checked (the config has no model_type, so nothing is required: transformers
    fills what is missing), and a layer count past the layers the tensors hold (`blk.N.`) is refused. A
    ModelError names the GGUF and its own key.
    """
    architecture = str(header.metadata.get("general.architecture", ""))
    config: dict[str, object] = {}
    keys: dict[str, str] = {}  # config name -> the GGUF's key
    for suffix, name in _config_names(architecture).items():
        key = f"{architecture}.{suffix}"
        if isinstance(name, str) and key in header.metadata:
            config[name], keys[name] = header.metadata[key], key
    try:
        layers = Architecture.from_config(config, source=path).layers
    except ImpossibleValue as exc:
        raise ModelError(
            f"{path}: {keys.get(exc.key, exc.key)} = {exc.value!r} is impossible ({exc.why})", hint=DAMAGED
        ) from None
    held = layers_held(header.tensors)
    if held and layers > held:
        key = keys[config_key(config, SIZE_KEYS["layers"])]
        raise ModelError(f"{path}: {key} = {layers} is impossible (its tensors hold {held} layers)", hint=DAMAGED)


def _no_random_init() -> AbstractContextManager[object]:
    """transformers' switch that builds a model without drawing its random initial weights (a no-op elsewhere)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return nullcontext()
    return no_init_weights()


def convert_gguf(
    gguf: Path,
    dest: Path,
    *,
    source: str,
    notify: Notify = _ignore,
    extra_files: Sequence[Path] = (),
    progress: Progress | None = None,
) -> None:
    """Dequantize a GGUF into a plain fp32 safetensors folder, atomically (temp folder + rename).

    `extra_files` (a licence, a notice) are copied into the folder as they are. Interrupted (Ctrl-C), it
    says so and leaves nothing in the cache: the next run converts again.
    """
    header = check_gguf_file(gguf)  # an empty, foreign or cut-short file, said in a millisecond rather than by numpy
    if header is not None:
        check_gguf_sizes(gguf, header)  # before transformers builds a model of the sizes it says
    notify(f"converting {gguf.name} to safetensors (once; cached in {dest})")
    started = time.monotonic()
    stage = f"converting {gguf.name}"

    def step(done: int) -> None:
        if progress is not None:
            progress(stage, done, len(STEPS), STEPS[done] if done < len(STEPS) else "done")

    step(0)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptcli.hardware import quiet_transformers

    quiet_transformers()
    tmp = temp_dir_beside(dest)
    published = False
    try:
        try:
            with _one_gguf_parse():
                step(1)
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                step(2)
                with _no_tqdm_bar(), _one_tensor_name_map():
                    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:
            raise ModelError(f"cannot read GGUF file {gguf}: {exc}", hint="is it a complete GGUF file?") from None
        step(3)
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild a plain one.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with _no_random_init():  # every weight comes from the GGUF: a random init first took ~2.5 s
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)  # shares the tensors, no copy
        plain.tie_weights()
        plain.eval()
        probe = torch.tensor([[1, 2, 3, 4]])
        with torch.inference_mode():
            read, rebuilt = loaded(probe).logits, plain(probe).logits
        if not torch.isfinite(read).all():  # the GGUF's own model, before any rebuild: its file is at fault, not us
            raise ModelError(
                f"cannot convert GGUF file {gguf}: its model gives NaN or infinite logits"
                " (damaged weights or metadata)",
                hint=DAMAGED,
            )
        if not torch.allclose(read, rebuilt, atol=1e-5):
            raise ModelError(f"converting {gguf.name} changed the model's outputs", hint="report this bug")
        step(4)
        try:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for extra in extra_files:
                shutil.copyfile(extra, tmp / extra.name)
            write_source(tmp, source)
            apply_umask(tmp)
            publish_dir(tmp, dest, replace=not has_source(dest))
        except Exception as exc:  # safetensors says a full disk in a SafetensorError, the rest name a temporary file
            full = disk_full(exc, dest)
            if full is None:
                raise
            raise full from None
        published = True
        step(len(STEPS))
    except KeyboardInterrupt:
        if not published:
            notify(f"interrupted: {gguf.name} was not converted; nothing was kept, the next run converts it again")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notify(f"converted {gguf.name} in {time.monotonic() - started:.0f} s")
