"""What users of ollama, llama.cpp and simonw's `llm` type by habit, and gptcli's word for it.

Click answers `gptcli run` with "Did you mean 'runs'?" (training runs) and `--temp` with "Possible options:
--stop, --system, --template": close in spelling, far in meaning. A name listed here gets the usage error's
hint instead, naming what gptcli calls it.
"""

from __future__ import annotations

import re
from typing import Any

RUN = 'gptcli generate "PROMPT" for one reply, gptcli chat for a conversation'
COMMANDS = {
    "run": RUN,
    "prompt": RUN,
    "list": "gptcli models list",
    "ls": "gptcli models list",
    "pull": "gptcli models pull NAME",
    "show": "gptcli models info NAME",
    "info": "gptcli models info NAME",
    "server": "gptcli serve",
    "logs": "gptcli chats list (saved conversations)",
    "help": "gptcli --help, or gptcli COMMAND --help",
    "version": "gptcli --version",
}
# A flag of another tool → gptcli's, when the command has it.
OPTIONS = {
    "--temp": "--temperature",
    "--n-predict": "--max-tokens",
    "--num-predict": "--max-tokens",
    "--max-new-tokens": "--max-tokens",
    "--repeat-penalty": "--repetition-penalty",
    "--system-prompt": "--system",
    "--key": "--api-key",
}
MODEL_FLAGS = {"-m", "--model"}  # gptcli's own: `export` and `models info` take the model as their argument
PROMPT_FLAGS = {"-p", "--prompt"}  # llama.cpp's: gptcli's prompt is the argument
CONTEXT_FLAGS = {"--ctx-size", "--ctx_size", "--num-ctx", "--context-length"}
ROOT_FLAGS = {"-q", "--quiet", "-v", "--verbose", "-V", "--version"}  # gptcli's own, before the command
_NO_SUCH_COMMAND = re.compile(r"^No such command '([^']*)'")
# Words past what a command takes: an unquoted prompt, or a prompt given to chat as to `ollama run`.
EXTRA_WORDS = {
    "generate": 'quote a prompt of several words: gptcli generate "Write a haiku"',
    "chat": 'chat takes no prompt: type it at its prompt, pipe it in (echo "TEXT" | gptcli chat), '
    'or use gptcli generate "TEXT"',
}


def habit_hint(exc: Any) -> tuple[str, str] | None:
    """For a Click usage error about a name another tool uses: (the message, a hint with gptcli's name)."""
    message = exc.format_message()
    command = _NO_SUCH_COMMAND.match(message)
    if command and command[1] in COMMANDS:
        return f"No such command '{command[1]}'.", f"use {COMMANDS[command[1]]}"
    name = getattr(exc, "option_name", None)
    context = getattr(exc, "ctx", None)
    if message.startswith("Got unexpected extra argument") and context is not None:
        hint = EXTRA_WORDS.get(context.command.name)
        return (message, hint) if hint else None
    if not name or context is None:
        return None
    flags = {flag for param in context.command.params for flag in getattr(param, "opts", ())}
    message = f"No such option: {name}"
    ours = OPTIONS.get(name.replace("_", "-"))  # llama.cpp spells some with underscores (--n_predict)
    if ours in flags:
        return message, f"use {ours}"
    if name in PROMPT_FLAGS and context.command.name == "generate":
        return message, 'the prompt is the argument: gptcli generate "PROMPT" (or -f FILE, or stdin)'
    if name in ROOT_FLAGS and context.parent is not None:
        words = context.command_path.split()
        return message, f"{name} goes before the command: {' '.join([words[0], name, *words[1:]])} ..."
    if name in CONTEXT_FLAGS:
        return message, "gptcli always uses the model's whole context (`gptcli models info` shows it)"
    if name in MODEL_FLAGS and any(
        p.name == "model" and p.param_type_name == "argument" for p in context.command.params
    ):
        return message, f"the model is the argument here: {context.command_path} MODEL"  # -m everywhere else
    return None
