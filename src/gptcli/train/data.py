"""Corpus → clean text → tokens in a memory-mapped file (cached by content hash) → train/val split.

Three tokenizers: `char` (one token per character, a real `tokenizers` WordLevel tokenizer so every
other command reads it from tokenizer.json), `bpe` (byte-level BPE trained on the corpus) and `init`
(the fine-tuned model's own tokenizer). Documents are joined with the end-of-text token where the
tokenizer has one, and with a newline otherwise.

The corpus streams: documents are read one at a time (a text file is one document, at most
CORPUS_FILE; a JSONL file is read line by line), cleaned into a temporary spill file, and tokenized from
there into the token file, so its size is bounded by the disk, not the memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from gptcli.atomicio import temp_dir_beside, write_atomic
from gptcli.errors import InputError
from gptcli.paths import cache_dir
from gptcli.textio import CORPUS_FILE, decode_text, over_limit, read_text_file, text_pieces
from gptcli.train.checkpoint import CONFIG_FILE as RUN_CONFIG
from gptcli.train.vocab import EOT, UNK, bpe_tokenizer, char_tokenizer, run_interruptibly

Notify = Callable[[str], None]
# progress(stage, done, total): called as a long step advances; total None = not known in advance.
Progress = Callable[[str, int, "int | None"], None]
ENCODE_CHUNK = 256  # documents per tokenizer call, so that progress moves on big corpora
# A long document is tokenized in pieces cut after newlines: one encoding of a whole big text costs GBs
# (the tokenizer keeps offsets and alignments per byte). Measured on a 32 MB corpus of three files:
# 2.2 GB peak with whole documents, about 400 MB with these sizes.
ENCODE_PIECE_CHARS = 1 << 18  # the most characters encoded in one piece of a document
ENCODE_BATCH_CHARS = 2 << 20  # and in one tokenizer call
TRAIN_PIECE_CHARS = 1 << 16  # the BPE trainer takes 256 texts at a time, in parallel
ChatRenderer = Callable[[list[dict[str, str]]], str]
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".jsonl", ".py", ".csv", ".tex", ".html", ".json"}
FORMAT_VERSION = "1"


def _ignore(*_: Any) -> None:
    """The default `notify` and `progress`: nobody listens."""


def corpus_files(path: Path) -> list[Path]:
    """A file, or the text files under a folder (sorted; hidden ones and those of training runs skipped)."""
    if not path.exists():
        what = "a symbolic link that leads nowhere" if path.is_symlink() else "no such file or folder"
        raise InputError(f"{what}: {path}", hint="check --data")
    if path.is_file():
        return [path]
    if not path.is_dir():  # a pipe or a device: training reads its data more than once
        raise InputError(f"{path} is neither a file nor a folder", hint="save the data to a file first")
    runs = {p.parent for p in path.rglob(RUN_CONFIG)}  # training runs (`--data .` holds ./runs) are no corpus
    visible = (p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts))
    texts = (p for p in visible if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    files = sorted(p for p in texts if runs.isdisjoint(p.parents))
    if not files:
        raise InputError(f"{path} has no text files ({', '.join(sorted(TEXT_SUFFIXES))})", hint="check --data")
    return files


def read_documents(path: Path, chat: ChatRenderer | None = None) -> Iterator[str]:
    """Yield the raw documents: whole text files, or one per JSONL line (`text`, or chat `messages`)."""
    for file in corpus_files(path):
        if file.suffix.lower() == ".jsonl":
            yield from _jsonl_documents(file, chat)
        else:
            yield read_text_file(file, CORPUS_FILE)


def _jsonl_documents(file: Path, chat: ChatRenderer | None) -> Iterator[str]:
    try:
        handle = file.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read {file}: {exc.strerror}") from None
    with handle:
        number = 0
        while raw := handle.readline(CORPUS_FILE.max_bytes + 1):
            number += 1
            if len(raw) > CORPUS_FILE.max_bytes and not raw.endswith(b"\n"):
                raise over_limit(f"{file}:{number}", CORPUS_FILE)
            line = decode_text(raw, f"{file}:{number}", line=True)
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
                yield chat(_checked_messages(record["messages"], f"{file}:{number}"))
            else:
                raise InputError(f"{file}:{number}: expected a `text` string or a `messages` list")


def _checked_messages(messages: list[Any], where: str) -> list[dict[str, str]]:
    """A line's chat messages, each with a text `role` and `content` (else the chat template failed on them and
    the error blamed the model's template)."""
    for number, message in enumerate(messages, 1):
        if not (isinstance(message, dict) and all(isinstance(message.get(key), str) for key in ("role", "content"))):
            raise InputError(
                f"{where}: message {number} needs a `role` and a `content` that are text",
                hint='give each message as {"role": "user", "content": "..."} (content as one string, not parts)',
            )
    return messages


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


@dataclass
class CleanCorpus:
    """The cleaned, non-empty documents, spilled to a temporary file (length-prefixed UTF-8) as they stream by."""

    spill: IO[bytes]
    documents: int = 0
    chars: int = 0
    charset: set[str] = field(default_factory=set)
    digests: Any = field(default_factory=hashlib.sha256)  # over each document's own sha256

    def add(self, doc: str) -> None:
        data = doc.encode("utf-8")
        self.spill.write(len(data).to_bytes(8, "little") + data)
        self.digests.update(hashlib.sha256(data).digest())
        self.charset.update(doc)
        self.documents += 1
        self.chars += len(doc)

    def __iter__(self) -> Iterator[str]:
        self.spill.flush()
        self.spill.seek(0)
        while header := self.spill.read(8):
            yield self.spill.read(int.from_bytes(header, "little")).decode("utf-8")


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
    notify: Notify = _ignore,
    progress: Progress = _ignore,
) -> TokenData:
    """Read, clean, tokenize and cache the corpus; check that both splits hold a block per stream."""
    if tokenizer == "init" and init_tokenizer is None:
        raise InputError("tokenizer 'init' needs --init MODEL")
    total = 0
    for total, _ in enumerate(read_documents(data_path, chat), 1):  # a first pass, to know the total
        progress("reading", total, None)
    spill_dir = cache_dir() / "train-data"
    spill_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer == "init":
        assert init_tokenizer is not None
        spec = f"init:{eot_token}:" + hashlib.sha256(init_tokenizer.read_bytes()).hexdigest()
    else:
        spec = f"{tokenizer}:{vocab_size if tokenizer == 'bpe' else ''}:dedup={dedup_lines}"
    with tempfile.TemporaryFile(dir=spill_dir, prefix=".spill-") as spill:
        corpus = CleanCorpus(spill)
        for number, doc in enumerate(read_documents(data_path, chat), 1):
            cleaned = clean(doc, dedup_lines=dedup_lines)
            if cleaned.strip():
                corpus.add(cleaned)
            progress("cleaning", number, total)
        if not corpus.documents:
            raise InputError(f"{data_path} has no text (empty after cleaning)", hint="check --data")
        digest = hashlib.sha256(f"v{FORMAT_VERSION}|{spec}|".encode())
        digest.update(corpus.digests.digest())
        folder = cache_dir() / "train-data" / digest.hexdigest()[:24]
        meta, tokenizer_json = _token_cache(
            folder,
            corpus,
            tokenizer,
            vocab_size=vocab_size,
            init_tokenizer=init_tokenizer,
            eot_token=eot_token,
            notify=notify,
            progress=progress,
        )
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["count"],))
    split = int(len(tokens) * (1 - val_fraction))
    need = streams * (block_size + 2)
    if split < need or len(tokens) - split < block_size + 2:
        raise InputError(  # a block's window and the token after it, drawn from at least two starts: block + 2
            f"the corpus is too short: its {len(tokens):,} tokens split into {split:,} for training and"
            f" {len(tokens) - split:,} for validation (fraction {val_fraction}); each split needs at least"
            f" {block_size + 2}" + (f" (training {need}: {streams} streams)" if streams > 1 else ""),
            hint="give more text, or a smaller --set model.block_size",
        )
    return TokenData(folder / "tokens.bin", tokenizer_json, meta["vocab_size"], meta["eot_id"], tokens, split)


def _token_cache(
    folder: Path,
    corpus: CleanCorpus,
    tokenizer: str,
    *,
    vocab_size: int,
    init_tokenizer: Path | None,
    eot_token: str | None,
    notify: Notify,
    progress: Progress,
) -> tuple[dict[str, Any], str]:
    """(meta, tokenizer.json) of the token file in `folder`, tokenizing `corpus` into it unless it is cached."""
    meta_file = folder / "meta.json"
    cached = _cached(folder)
    if cached is not None:
        notify(f"tokens: cached in {folder}")
        meta, tokenizer_json = cached
    else:
        from tokenizers import Tokenizer

        if meta_file.exists():
            notify(f"tokens: the cache in {folder} does not read back; tokenizing again")
        notify(f"tokenizing {corpus.documents} document(s), {corpus.chars:,} characters ({tokenizer})")
        if tokenizer == "char":
            tok = char_tokenizer("".join(sorted(corpus.charset)) + "\n")
        elif tokenizer == "bpe":
            progress(f"training a {vocab_size}-token BPE", 0, None)
            tok = bpe_tokenizer((p for doc in corpus for p in text_pieces(doc, TRAIN_PIECE_CHARS)), vocab_size)
            progress(f"training a {vocab_size}-token BPE", 1, 1)
        else:
            assert init_tokenizer is not None
            tok = Tokenizer.from_file(str(init_tokenizer))
        eot_id = None if tokenizer == "char" else tok.token_to_id(eot_token or EOT)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = np.uint16 if vocab <= 2**16 else np.uint32
        folder.mkdir(parents=True, exist_ok=True)
        chunks = _encode_chunks(tok, corpus, tokenizer, eot_id, corpus.documents, progress)
        count = _write_tokens(folder / "tokens.bin", chunks, dtype)
        tokenizer_json = tok.to_str()
        write_atomic(folder / "tokenizer.json", tokenizer_json.encode("utf-8"))
        meta = {"count": count, "dtype": np.dtype(dtype).name, "vocab_size": vocab, "eot_id": eot_id}
        write_atomic(meta_file, json.dumps(meta).encode("utf-8"))  # last: marks the entry complete
        notify(f"tokens: {count:,} (vocab {vocab}) cached in {folder}")
    return meta, tokenizer_json


def _cached(folder: Path) -> tuple[dict[str, Any], str] | None:
    """(meta, tokenizer.json) of an entry that reads back whole and agrees with tokens.bin's size, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
        json.loads(tokenizer_json)
        ints = all(type(meta[key]) is int and meta[key] >= 0 for key in ("count", "vocab_size"))
        size = meta["count"] * np.dtype(meta["dtype"]).itemsize if meta["dtype"] in ("uint16", "uint32") else -1
        if ints and type(meta["eot_id"]) in (int, type(None)) and (folder / "tokens.bin").stat().st_size == size:
            return meta, tokenizer_json
    except (OSError, ValueError, TypeError, KeyError):  # ValueError: bad JSON or UTF-8
        pass
    return None


def _encode(tok: Any, documents: list[str], kind: str, eot_id: int | None, progress: Progress = _ignore) -> np.ndarray:
    """All of `documents` as one array of token ids (see `_encode_chunks`)."""
    return np.concatenate(list(_encode_chunks(tok, documents, kind, eot_id, len(documents), progress)))


def _encode_chunks(
    tok: Any, documents: Iterable[str], kind: str, eot_id: int | None, total: int, progress: Progress
) -> Iterator[np.ndarray]:
    """Token ids, a bounded piece at a time: char documents are joined by newlines, others each end with a
    separator. A document longer than a piece is cut after newlines (for BPE this may tokenize the cut a
    little differently from one whole call, which would cost GBs)."""
    progress("tokenizing", 0, total)  # from the start: a Ctrl-C in the first batch names this step
    if kind == "char":
        # One token per character: a table lookup equals the tokenizer's output, much faster.
        vocab = tok.get_vocab()
        table = {ord(ch): i for ch, i in vocab.items() if len(ch) == 1}
        newline = np.array([table.get(ord("\n"), vocab[UNK])], dtype=np.int64)
        for number, doc in enumerate(documents, 1):
            if number > 1:
                yield newline
            for start in range(0, len(doc), ENCODE_PIECE_CHARS):
                codes = np.frombuffer(doc[start : start + ENCODE_PIECE_CHARS].encode("utf-32-le"), dtype=np.uint32)
                unique, inverse = np.unique(codes, return_inverse=True)
                yield np.array([table.get(int(u), vocab[UNK]) for u in unique], dtype=np.int64)[inverse]
            if number % ENCODE_CHUNK == 0 or number == total:
                progress("tokenizing", number, total)
        return
    separator = np.asarray([eot_id] if eot_id is not None else tok.encode("\n", add_special_tokens=False).ids)
    pieces: list[str] = []
    ends: list[bool] = []  # whether each piece ends its document
    number = chars = 0
    for number, doc in enumerate(documents, 1):
        parts = list(text_pieces(doc, ENCODE_PIECE_CHARS)) or [""]
        for index, part in enumerate(parts):
            pieces.append(part)
            ends.append(index == len(parts) - 1)
            chars += len(part)
            if len(pieces) >= ENCODE_CHUNK or chars >= ENCODE_BATCH_CHARS:
                yield from _encode_batch(tok, pieces, ends, separator)
                pieces, ends, chars = [], [], 0
        if number % ENCODE_CHUNK == 0 and pieces:
            yield from _encode_batch(tok, pieces, ends, separator)
            pieces, ends, chars = [], [], 0
        if number % ENCODE_CHUNK == 0:
            progress("tokenizing", number, total)
    if pieces:
        yield from _encode_batch(tok, pieces, ends, separator)
    if number % ENCODE_CHUNK:
        progress("tokenizing", number, total)


def _encode_batch(tok: Any, pieces: list[str], ends: list[bool], separator: np.ndarray) -> Iterator[np.ndarray]:
    encodings = run_interruptibly(lambda: tok.encode_batch(pieces, add_special_tokens=False), name="gptcli-encode")
    for encoding, last in zip(encodings, ends, strict=True):
        yield np.asarray(encoding.ids, dtype=np.int64)
        if last:
            yield separator


def _write_tokens(path: Path, chunks: Iterable[np.ndarray], dtype: Any) -> int:
    """Stream token ids into `path` (a temp file, fsynced, then renamed); returns how many."""
    folder = temp_dir_beside(path)  # named after this process: those of writers killed with -9 (GBs) go
    count = 0
    try:
        with open(folder / path.name, "wb") as handle:
            for ids in chunks:
                handle.write(ids.astype(dtype).tobytes())
                count += len(ids)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return count
