"""The tokenizers a fresh run makes from its corpus: one token per character, or a byte-level BPE."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

UNK = "<unk>"
EOT = "<|endoftext|>"
T = TypeVar("T")


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


def bpe_tokenizer(documents: Iterable[str], vocab_size: int) -> Any:
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
    run_interruptibly(lambda: tok.train_from_iterator(documents, trainer), name="gptcli-bpe")
    return tok


def run_interruptibly(work: Callable[[], T], *, name: str) -> T:
    """`work()` on a thread while this one waits, so that Ctrl-C stops the wait at once.

    The tokenizers library trains and encodes in Rust without the GIL and never looks at signals: on the
    main thread, Ctrl-C waited for the whole call (seconds; minutes for a BPE on a big corpus). Abandoned,
    the thread ends with the process. Its exception, if any, is raised here.
    """
    done: list[T] = []
    failed: list[BaseException] = []

    def target() -> None:
        try:
            done.append(work())
        except BaseException as exc:  # raised again on the waiting thread
            failed.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if failed:
        raise failed[0]
    return done[0]
