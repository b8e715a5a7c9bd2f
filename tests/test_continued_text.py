"""A reply that continues its prompt's text is decoded after the prompt's last tokens (as vLLM decodes a completion):
a sentencepiece decoder (Llama 2, Mistral v0.1, TinyLlama) strips the first space of a text, so "▁42" alone reads
"42" and "The answer is" + "42" was "The answer is42". A new chat turn's reply still reads alone (no leading space).

The tokenizer here is Llama 2's kind, written by hand: sentencepiece's BPE with byte fallback, its normalizer (a
space before the text, spaces as ▁) and its decoder (▁ as spaces, bytes, then one leading space stripped).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from gptcli.config import SamplingConfig, Settings, with_sampling
from gptcli.decoding import Finished, IncrementalDetokenizer, Token
from gptcli.engine import generate
from gptcli.tokenizer import Tokenizer
from tests.conftest import run_cli
from tests.scripted import ScriptedBackend, ScriptedCache

WORDS = ["▁The", "▁answer", "▁is", "▁42", "▁Hello", "▁world", "."]
LLAMA2_CHAT = (  # Llama 2's shape: a reply follows "[/INST]" (no generation prompt of its own)
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] }}{% endif %}{% endfor %}"
)
GREEDY = SamplingConfig(temperature=0.0, max_tokens=20, repetition_stop=False)


def write_sentencepiece_model(folder: Path) -> Path:
    """A model folder whose tokenizer decodes as Llama 2's (its config for the scripted backend: the vocabulary)."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, normalizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # each word one token, built a character at a time
        for end in range(1, len(word) + 1):
            vocab.setdefault(word[end - 1], len(vocab))
            if end > 1 and (word[: end - 1], word[end - 1]) not in merges:
                merges.append((word[: end - 1], word[end - 1]))
            vocab.setdefault(word[:end], len(vocab))
    tok = FastTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": LLAMA2_CHAT}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps({"vocab_size": len(vocab), "eos_token_id": 2, "bos_token_id": 1}))
    return folder


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory) -> Path:
    return write_sentencepiece_model(tmp_path_factory.mktemp("spm") / "llama2-like")


@pytest.fixture(scope="module")
def spm(spm_folder) -> Tokenizer:
    return Tokenizer(spm_folder)


def ids_of(tok: Tokenizer, *pieces: str) -> list[int]:
    return [tok.token_to_id(piece) for piece in pieces]


def test_this_tokenizer_strips_the_space_of_a_first_word(spm):
    # The point of every test here: alone, the reply's first token loses its space.
    prompt = spm.encode("The answer is")
    assert prompt == ids_of(spm, "<s>", "▁The", "▁answer", "▁is")
    assert spm.decode(ids_of(spm, "▁42")) == "42"
    assert spm.decode([*prompt, *ids_of(spm, "▁42")]) == "The answer is 42"


def test_the_detokenizer_reads_the_reply_after_its_context(spm):
    prompt, reply = spm.encode("The answer is"), ids_of(spm, "▁42", ".", "▁Hello")
    detok = IncrementalDetokenizer(spm, prompt)
    pieces = [detok.add(token) for token in reply] + [detok.flush()]
    assert pieces == [" 42", ".", " Hello", ""]
    assert spm.decode(prompt) + "".join(pieces) == spm.decode(prompt + reply)
    assert detok.ids == reply  # the reply's own tokens: the decoder counts them
    alone = IncrementalDetokenizer(spm)
    assert "".join(alone.add(token) for token in reply) == "42. Hello"


def test_a_character_split_across_the_prompt_and_the_reply_reads_whole(spm):
    # "日" is three byte tokens (E6 97 A5): the prompt holds two, the reply the third.
    split = spm.encode("The 日", add_special_tokens=False)
    assert spm.decode(split[-2:]) == "\ufffd\ufffd"  # a piece of a character: not text yet
    prompt, reply = [1, *split[:-1]], [split[-1], *ids_of(spm, "▁is")]
    detok = IncrementalDetokenizer(spm, prompt)
    text = "".join(detok.add(token) for token in reply) + detok.flush()
    assert text == "日 is"  # the character the prompt began, then the reply's own text
    assert spm.decode(prompt).removesuffix("\ufffd\ufffd") + text == spm.decode(prompt + reply)


def detokenized(tok: Tokenizer, context: Sequence[int], reply: Sequence[int]) -> str:
    detok = IncrementalDetokenizer(tok, context)
    return "".join(detok.add(token) for token in reply) + detok.flush()


@pytest.mark.parametrize("kind", ["byte-level", "strip"])
def test_a_prompt_that_ends_in_replacement_characters_keeps_them(kind, tiny_models, spm):
    """A prompt's U+FFFD (a literal one, or bytes that end it inside a character the reply does not finish) was
    written again before the reply's text: "abc\ufffd" + " is" read "\ufffd is"."""
    tok = spm if kind == "strip" else Tokenizer(tiny_models["llama"])
    reply = ids_of(spm, "▁is") if kind == "strip" else tok.encode(" is", add_special_tokens=False)
    rocket = tok.encode("abc 🚀", add_special_tokens=False)
    unfinished = rocket[:-1]  # the rocket's last byte is missing
    assert tok.decode(unfinished).endswith("\ufffd")
    for prompt in (tok.encode("abc\ufffd"), unfinished):
        assert detokenized(tok, prompt, reply) == " is"
        assert tok.decode(prompt) + " is" == tok.decode([*prompt, *reply])
    # The reply that finishes the character writes it whole, and nothing of the prompt (GPT-2's byte-level BPE
    # has the rocket's first byte in the space's token: " 🚀" wrote that space again).
    assert detokenized(tok, unfinished, [rocket[-1], *reply]) == "🚀 is"


def run_reply(tok: Tokenizer, prompt: Sequence[int], reply: Sequence[int], params: SamplingConfig) -> list:
    backend = ScriptedBackend([*reply, 2], tok.vocab_size, context_length=128)
    return list(generate(backend, tok, list(prompt), params))


def test_a_completion_keeps_its_first_space_and_streams_what_it_says(spm):
    prompt, reply = spm.encode("The answer is"), ids_of(spm, "▁42", ".")
    events = run_reply(spm, prompt, reply, GREEDY)  # a new turn's reply, as before: read alone
    assert events[-1].text == "42."
    events = run_reply(spm, prompt, reply, replace(GREEDY, continues_prompt=True))
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.text == " 42."
    assert "".join(e.text for e in events if isinstance(e, Token)) == finished.text
    assert spm.decode(prompt) + finished.text == spm.decode(prompt + reply)
    assert finished.token_ids == tuple(reply) and finished.stats.new_tokens == 2


# ---------------------------------------------------------------------------------------------- front doors


def test_generate_raw_prints_the_completion_with_its_space(tiny_models, spm, tmp_path):
    folder = write_sentencepiece_model(tmp_path / "model")  # with the tiny Llama's weights, for the model's checks
    shutil.copy(tiny_models["llama"] / "model.safetensors", folder / "model.safetensors")
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))  # its 400 ids hold these
    script = ids_of(spm, "▁42", ".", "</s>")
    env = {"GPTCLI_BACKEND_PATHS": "scripted=tests.scripted:ScriptedBackend", "GPTCLI_TEST_SCRIPT": json.dumps(script)}
    done = run_cli("generate", "--raw", "The answer is", "-m", str(folder), "-b", "scripted", env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().rstrip("\n") == " 42."
    chat = run_cli("generate", "What is it?", "-m", str(folder), "-b", "scripted", env=env)
    assert chat.returncode == 0, chat.stderr.decode()
    assert chat.stdout.decode().rstrip("\n") == "42."  # a new turn's reply, after [/INST]: no leading space


def test_batch_lines_continue_their_text_where_their_prompt_does(spm):
    from gptcli.batch_requests import parse_request
    from gptcli.batchfile import LocalLines, run_batch
    from gptcli.engine import Engine, EngineLimits
    from gptcli.jsonl import ResultWriter, read_lines

    ask = {"role": "user", "content": "What is it?"}
    lines = [
        {"id": "raw", "prompt": "The answer is", "raw": True},  # a completion of the text
        {"id": "asked", "prompt": "What is it?"},  # the user's message in the chat template: a new turn
        {"id": "turn", "messages": [ask]},
        {"id": "begun", "messages": [ask, {"role": "assistant", "content": "The answer is"}]},  # continued
    ]
    settings = with_sampling(Settings(), temperature=0.0, max_tokens=8)
    data = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
    requests = (parse_request(n, raw, spm, settings, 128) for n, raw in read_lines(data))
    backend = Reciting([*ids_of(spm, "▁42", "."), 2], spm.vocab_size, context_length=128)
    stream = io.StringIO()
    run_batch(LocalLines(Engine(backend, spm, EngineLimits(max_running=2))), requests, ResultWriter(stream))
    texts = {record["id"]: record["text"] for record in map(json.loads, stream.getvalue().splitlines())}
    assert texts == {"raw": " 42.", "asked": "42.", "turn": "42.", "begun": " 42."}


class Reciting(ScriptedBackend):
    """Every sequence says the same script, whatever its prompt: after the script's tokens, the next one; after any
    other, its first. So each of the server's requests gets the whole reply, its prompt scored or not."""

    def forward(self, ids: Sequence[int], cache: ScriptedCache) -> tuple[np.ndarray, ScriptedCache]:
        said = self.script[:-1]
        logits = np.zeros(self.vocab_size, dtype=np.float32)
        logits[self.script[said.index(ids[-1]) + 1] if ids[-1] in said else self.script[0]] = 50.0
        cache.length += len(ids)
        return logits, cache


@pytest.fixture
def live(spm) -> Iterator[Any]:
    from tests.test_server import serve_runtime

    backend = Reciting([*ids_of(spm, "▁42", ".", "▁Hello"), 2], spm.vocab_size, context_length=128)
    with serve_runtime(SimpleNamespace(backend=backend, tokenizer=spm), max_running=2) as server:
        yield server


def post(live: Any, route: str, **body: Any) -> Any:
    import httpx

    reply = httpx.post(f"{live.v1}/{route}", json={"model": "tiny-llama", "temperature": 0, **body}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply


def streamed(reply: Any) -> list[dict[str, Any]]:
    lines = [line.removeprefix("data: ") for line in reply.text.splitlines() if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def test_the_server_completes_a_prompt_with_its_first_space(live, spm):
    whole = post(live, "completions", prompt="The answer is", logprobs=1).json()["choices"][0]
    assert whole["text"] == " 42. Hello"
    scored = whole["logprobs"]  # each token named by its text in the reply, its offset where it starts
    assert scored["tokens"] == [" 42", ".", " Hello"] and scored["text_offset"] == [0, 3, 4]
    chunks = streamed(post(live, "completions", prompt="The answer is", logprobs=1, stream=True))
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole["text"]
    echoed = post(live, "completions", prompt="The answer is", echo=True, logprobs=1).json()["choices"][0]
    assert echoed["text"] == "The answer is 42. Hello" == spm.decode(spm.encode(echoed["text"]))
    text, tokens, offsets = echoed["text"], echoed["logprobs"]["tokens"], echoed["logprobs"]["text_offset"]
    assert all(text[offset:].startswith(token) for token, offset in zip(tokens[1:], offsets[1:], strict=True))
    assert tokens[-3:] == [" 42", ".", " Hello"]


@pytest.mark.parametrize("kind", ["byte-level", "strip"])
def test_echoed_text_offsets_index_the_prompt_as_sent(kind, tiny_models, spm):
    """With echo, text_offset counted the prompt's decoded text, which can read otherwise than the prompt the
    client sent (a special token's text written in it is skipped when decoded; a strip decoder reads a segment
    after it with one more space), so the reply's offsets were off by the difference."""
    from gptcli.decoding import NO_STATS
    from gptcli.sampling import TokenLogprob
    from gptcli.server.shapes import Shape

    tok = spm if kind == "strip" else Tokenizer(tiny_models["llama"])
    reply = ids_of(spm, "▁42", ".") if kind == "strip" else tok.encode(" 42.", add_special_tokens=False)
    for sent in (f"Hi{tok.eos_token} there", " leading"):
        ids = tok.encode(sent)
        shape = Shape("text", "m", echo=sent, tokenizer=tok, prompt_ids=ids, context=ids)
        scored = tuple(TokenLogprob(-1.0, ()) for _ in ids)
        done = Finished("length", NO_STATS, " 42.", tuple(reply), scored[: len(reply)], (None, *scored[1:]))
        choice = shape.choice(done, "length", with_logprobs=True)
        text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
        assert text == sent + " 42." and len(tokens) == len(offsets) == len(ids) + len(reply)
        assert offsets[len(ids)] == len(sent), sent  # the reply starts where the prompt as sent ends
        assert offsets == sorted(offsets)
        assert all(text[offset:].startswith(token) for token, offset in zip(tokens[1:], offsets[1:], strict=True))


def test_the_server_echoes_the_prompt_as_sent_and_offsets_index_it(live):
    echoed = post(live, "completions", prompt="Hi</s> there", echo=True, logprobs=1).json()["choices"][0]
    assert echoed["text"] == "Hi</s> there 42. Hello"
    assert echoed["logprobs"]["tokens"][-3:] == [" 42", ".", " Hello"]
    assert echoed["logprobs"]["text_offset"][-3:] == [12, 15, 16]


@pytest.mark.parametrize(("keep", "text"), [(False, ""), (True, " 4")])
def test_a_stop_string_may_begin_with_the_first_words_space(live, keep, text):
    asked = dict(prompt="The answer is", stop=[" 4"], include_stop_str_in_output=keep)
    whole = post(live, "completions", **asked).json()["choices"][0]
    assert (whole["text"], whole["finish_reason"]) == (text, "stop")
    chunks = streamed(post(live, "completions", **asked, stream=True))
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == text


def test_a_completion_of_token_ids_that_end_inside_a_character_writes_it_whole(spm):
    from tests.test_server import serve_runtime

    split = spm.encode("The 日", add_special_tokens=False)  # "日" is three byte tokens (E6 97 A5)
    assert spm.decode(split[-2:]) == "\ufffd\ufffd"
    prompt = [1, *split[:-1]]  # it stops after two of them: the reply's first token is the third
    backend = Reciting([split[-1], *ids_of(spm, "▁is"), 2], spm.vocab_size, context_length=128)
    with serve_runtime(SimpleNamespace(backend=backend, tokenizer=spm)) as server:
        text = post(server, "completions", prompt=prompt, logprobs=1).json()["choices"][0]["text"]
    assert text == "日 is"  # the character the prompt began, then the reply's own text
    assert spm.decode(prompt).removesuffix("\ufffd\ufffd") + text == spm.decode(
        [*prompt, split[-1], *ids_of(spm, "▁is")]
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_completion_writes_none_of_its_prompts_replacement_characters(live, spm, stream):
    unfinished = spm.encode("The 日")[:-1]  # token ids that end inside "日"
    for prompt in ("abc\ufffd", unfinished):
        reply = post(live, "completions", prompt=prompt, stream=stream)
        texts = [c["choices"][0]["text"] for c in streamed(reply)] if stream else [reply.json()["choices"][0]["text"]]
        assert "".join(texts) == " 42. Hello", prompt


def test_a_new_chat_turn_reads_alone_and_a_continued_message_reads_on(live):
    ask = [{"role": "user", "content": "What is it?"}]
    turn = post(live, "chat/completions", messages=ask, logprobs=True).json()["choices"][0]
    assert turn["message"]["content"] == "42. Hello"  # no leading space, as transformers decodes a reply
    assert [entry["token"] for entry in turn["logprobs"]["content"]] == ["42", ".", " Hello"]
    begun = [*ask, {"role": "assistant", "content": "The answer is"}]
    continued = post(live, "chat/completions", messages=begun, logprobs=True).json()["choices"][0]
    assert continued["message"]["content"] == " 42. Hello"  # "The answer is" + it reads as one text
    first = continued["logprobs"]["content"][0]
    assert (first["token"], bytes(first["bytes"])) == (" 42", b" 42")
    chunks = streamed(post(live, "chat/completions", messages=begun, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == " 42. Hello"


def test_byte_level_tokens_are_named_as_before(tiny_models):
    # GPT-2's byte-level BPE has no space to lose: a token's text after another is its text alone.
    from gptcli.sampling import TokenLogprob
    from gptcli.server.shapes import Shape

    tok = Tokenizer(tiny_models["llama"])
    ids = tok.encode("ROMEO: But soft, café 🚀 light", add_special_tokens=False)
    shape = Shape("text", "m", tokenizer=tok, context=ids[:2])
    names = shape.logprobs([(i, TokenLogprob(0.0, ())) for i in ids[2:]])["tokens"]
    assert names == [tok.decode([i]) for i in ids[2:]]


def test_a_reply_with_no_tokens_has_empty_logprobs(tiny_models):
    """A chat reply whose only tokens a stop string took (logprobs asked for) was a 500: the tokens before
    each token were one more than the tokens ('zip() argument 2 is longer than argument 1'). Found by the fuzzer."""
    from gptcli.server.shapes import Shape

    tok = Tokenizer(tiny_models["llama"])
    for kind in ("chat", "text"):
        shape = Shape(kind, "m", tokenizer=tok, context=tok.encode("Hello", add_special_tokens=False))
        scored = shape.logprobs([])
        assert scored.get("content", scored.get("tokens")) == [], kind
