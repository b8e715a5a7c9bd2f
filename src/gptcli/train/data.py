"""Corpus → clean text → tokens in a memory-mapped file (cached by content hash) → train/val split.

Three tokenizers: `char` (one token per character, a real `tokenizers` WordLevel tokenizer so every
other command reads it from tokenizer.json), `bpe` (byte-level BPE trained on the corpus) and `init`
(the fine-tuned model's own tokenizer). Documents are joined with the end-of-text token where the
tokenizer has one, and with a newline otherwise.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.atomicio import write_atomic
from gptcli.errors import InputError
from gptcli.paths import cache_dir
from gptcli.textio import decode_text

Notify = Callable[[str], None]
# progress(stage, done, total): called as a long step advances; total None = not known in advance.
Progress = Callable[[str, int, "int | None"], None]
ENCODE_CHUNK = 256  # documents per tokenizer call, so that progress moves on big corpora
ChatRenderer = Callable[[list[dict[str, str]]], str]
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".jsonl", ".py", ".csv", ".tex", ".html", ".json"}
UNK = "<unk>"
EOT = "<|endoftext|>"
FORMAT_VERSION = "1"


def _no_progress(_: str, __: int, ___: int | None) -> None:
    pass


def _noop(_: str) -> None:
    pass


# ---------------------------------------------------------------- reading and cleaning


def corpus_files(path: Path) -> list[Path]:
    """A file, or the text files under a folder (sorted, hidden ones skipped)."""
    if not path.exists():
        raise InputError(f"no such file or folder: {path}", hint="check --data")
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.suffix.lower() in TEXT_SUFFIXES
    )
    if not files:
        raise InputError(f"{path} has no text files ({', '.join(sorted(TEXT_SUFFIXES))})", hint="check --data")
    return files


def read_documents(path: Path, chat: ChatRenderer | None = None) -> Iterator[str]:
    """Yield the raw documents: whole text files, or one per JSONL line (`text`, or chat `messages`)."""
    for file in corpus_files(path):
        try:
            text = decode_text(file.read_bytes(), str(file))
        except OSError as exc:
            raise InputError(f"cannot read {file}: {exc.strerror}") from None
        if file.suffix.lower() != ".jsonl":
            yield text
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise InputError(f"{file}:{number}: not a JSON object", hint="one JSON object per line") from None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield record["text"]
            elif isinstance(record, dict) and isinstance(record.get("messages"), list):
                if chat is None:
                    raise InputError(
                        f"{file}:{number}: chat messages need a chat template",
                        hint="fine-tune a chat model with --init MODEL, or give a `text` field",
                    )
                yield chat(record["messages"])
            else:
                raise InputError(f"{file}:{number}: expected a `text` string or a `messages` list")


def clean(text: str, *, dedup_lines: bool = False) -> str:
    """Unicode NFC, newlines normalised, control characters (except tab and newline) removed."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in set(text)):
        text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    if dedup_lines:
        seen: set[str] = set()
        kept = []
        for line in text.split("\n"):
            if line.strip() and line in seen:
                continue
            seen.add(line)
            kept.append(line)
        text = "\n".join(kept)
    return text


# ---------------------------------------------------------------- tokenizers


def char_tokenizer(chars: str) -> Any:
    """A `tokenizers` tokenizer with one token per character (ids in sorted character order)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(set(chars)))}
    vocab[UNK] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([UNK])
    return tok


def bpe_tokenizer(documents: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style) trained on the corpus, with an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    return tok


# ---------------------------------------------------------------- the token file


@dataclass(frozen=True)
class TokenData:
    """The tokenized corpus: a read-only memmap, split by position into train and val."""

    path: Path
    tokenizer_json: str
    vocab_size: int
    eot_id: int | None
    tokens: np.ndarray
    split: int

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: self.split]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.split :]


def prepare(
    data_path: Path,
    *,
    tokenizer: str,
    vocab_size: int,
    val_fraction: float,
    block_size: int,
    dedup_lines: bool = False,
    init_tokenizer: Path | None = None,
    chat: ChatRenderer | None = None,
    eot_token: str | None = None,
    streams: int = 1,
    notify: Notify = _noop,
    progress: Progress = _no_progress,
) -> TokenData:
    """Read, clean, tokenize and cache the corpus; check that both splits hold a block per stream."""
    documents = []
    for doc in read_documents(data_path, chat):
        documents.append(doc)
        progress("reading", len(documents), None)
    for number, doc in enumerate(documents):  # in place: the raw text is not held twice
        documents[number] = clean(doc, dedup_lines=dedup_lines)
        progress("cleaning", number + 1, len(documents))
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise InputError(f"{data_path} has no text (empty after cleaning)", hint="check --data")

    if tokenizer == "init":
        if init_tokenizer is None:
            raise InputError("tokenizer 'init' needs --init MODEL")
        spec = f"init:{eot_token}:" + hashlib.sha256(init_tokenizer.read_bytes()).hexdigest()
    else:
        spec = f"{tokenizer}:{vocab_size if tokenizer == 'bpe' else ''}:dedup={dedup_lines}"
    digest = hashlib.sha256(f"v{FORMAT_VERSION}|{spec}|".encode())
    for doc in documents:
        digest.update(hashlib.sha256(doc.encode("utf-8")).digest())
    folder = cache_dir() / "train-data" / digest.hexdigest()[:24]
    meta_file = folder / "meta.json"

    if meta_file.is_file():
        notify(f"tokens: cached in {folder}")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
    else:
        from tokenizers import Tokenizer

        chars = sum(len(d) for d in documents)
        notify(f"tokenizing {len(documents)} document(s), {chars:,} characters ({tokenizer})")
        if tokenizer == "char":
            tok = char_tokenizer("".join(documents) + "\n")
        elif tokenizer == "bpe":
            progress(f"training a {vocab_size}-token BPE", 0, None)
            tok = bpe_tokenizer(documents, vocab_size)
            progress(f"training a {vocab_size}-token BPE", 1, 1)
        else:
            assert init_tokenizer is not None
            tok = Tokenizer.from_file(str(init_tokenizer))
        eot_id = None if tokenizer == "char" else tok.token_to_id(eot_token or EOT)
        ids = _encode(tok, documents, tokenizer, eot_id, progress)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = np.uint16 if vocab <= 2**16 else np.uint32
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "tokens.bin", ids.astype(dtype).tobytes())
        tokenizer_json = tok.to_str()
        write_atomic(folder / "tokenizer.json", tokenizer_json.encode("utf-8"))
        meta = {"count": int(ids.size), "dtype": np.dtype(dtype).name, "vocab_size": vocab, "eot_id": eot_id}
        write_atomic(meta_file, json.dumps(meta).encode("utf-8"))  # last: marks the entry complete
        notify(f"tokens: {ids.size:,} (vocab {vocab}) cached in {folder}")

    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["count"],))
    split = int(len(tokens) * (1 - val_fraction))
    need = streams * (block_size + 2)
    if split < need or len(tokens) - split < block_size + 2:
        raise InputError(
            f"the corpus is too short: {len(tokens):,} tokens, but one block needs {block_size + 1} tokens"
            f" in each split ({streams} training stream(s), validation fraction {val_fraction})",
            hint="give more text, or a smaller --set model.block_size",
        )
    return TokenData(folder / "tokens.bin", tokenizer_json, meta["vocab_size"], meta["eot_id"], tokens, split)


def _encode(
    tok: Any, documents: list[str], kind: str, eot_id: int | None, progress: Progress = _no_progress
) -> np.ndarray:
    if kind == "char":
        # One token per character: a table lookup equals the tokenizer's output, much faster.
        vocab = tok.get_vocab()
        text = "\n".join(documents)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = {ord(ch): i for ch, i in vocab.items() if len(ch) == 1}
        unique, inverse = np.unique(codes, return_inverse=True)
        mapped = np.array([table.get(int(u), vocab[UNK]) for u in unique], dtype=np.int64)
        progress("tokenizing", len(documents), len(documents))
        return mapped[inverse]
    separator = [eot_id] if eot_id is not None else tok.encode("\n", add_special_tokens=False).ids
    pieces: list[np.ndarray] = []
    for start in range(0, len(documents), ENCODE_CHUNK):
        chunk = documents[start : start + ENCODE_CHUNK]
        for encoding in tok.encode_batch(chunk, add_special_tokens=False):
            pieces.append(np.asarray(encoding.ids, dtype=np.int64))
            pieces.append(np.asarray(separator, dtype=np.int64))
        progress("tokenizing", start + len(chunk), len(documents))
    return np.concatenate(pieces)
