"""An output path that cannot be written (a read-only disk) is said the same way, with the same exit code, by
every command that writes one: exit 1, the environment (README's table), as an unwritable GPTCLI_HOME is."""

from __future__ import annotations

import pytest

from gptcli.cli.app import run


def _commands(tiny_models, tmp_path, out):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n" * 40)
    batch = tmp_path / "requests.jsonl"
    batch.write_text('{"prompt": "hi"}\n')
    model = str(tiny_models["gpt2"])
    return {
        "generate --batch -o": ["generate", "-m", model, "--batch", str(batch), "-o", str(out / "r.jsonl"), "-n", "2"],
        "bench --output": ["bench", "-m", model, "--output", str(out / "b.jsonl")],
        "config init": ["config", "init", str(out / "c.yaml")],
        "export --output": ["export", model, "--output", str(out / "e")],
        "chats export -o": ["chats", "export", "20260101-000000-abcd", "-o", str(out / "n.md")],
        "train --out": [
            "train",
            "--data",
            str(corpus),
            "--preset",
            "tiny",
            "--out",
            str(out / "run"),
            "--max-iters",
            "1",
        ],
    }


@pytest.mark.parametrize(
    "command",
    ["generate --batch -o", "bench --output", "config init", "export --output", "chats export -o", "train --out"],
)
def test_an_output_path_on_a_read_only_disk_is_exit_1_naming_it(command, tiny_models, tmp_path, read_only_disk, capsys):
    """`generate --batch -o` and `bench --output` said it with exit 6 (bad input), `config init` and `export
    --output` with exit 1."""
    from gptcli.chat.conversation import Conversation, ConversationStore

    ConversationStore().save(
        Conversation(id="20260101-000000-abcd", model="m", messages=[{"role": "user", "content": "hi"}])
    )
    argv = _commands(tiny_models, tmp_path, read_only_disk)[command]
    assert run(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error: ", "hint: "))]
    assert len(errors) == 2 and errors[0].startswith(f"error: {read_only_disk}"), errors
    assert "Read-only file system" in errors[0] and errors[1] == "hint: choose a path on a writable disk"
    assert list(read_only_disk.iterdir()) == []
