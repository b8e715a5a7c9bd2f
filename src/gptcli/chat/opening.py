"""Which conversation `gptcli chat` holds (a new one, the latest, or one by id) and the settings it is held with."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gptcli.chat.conversation import Conversation, ConversationStore
from gptcli.config import OutputConstraint, Resolved, Settings, with_output
from gptcli.constraints import check


def open_conversation(
    resolved: Resolved,
    store: ConversationStore,
    *,
    latest: bool = False,
    ref: str | None = None,
    output: OutputConstraint | None = None,
    output_given: bool = False,
    remote: bool = False,
) -> tuple[Settings, Conversation]:
    """The conversation to hold (a new one, the latest, or `ref`) and the settings to hold it with.

    A resumed conversation keeps its model unless one is given now, and with it its chat template file unless
    one is given now (another model starts from its own template); it takes a new system message only
    when one is given now, gets back its `/set` changes except those given again as flags, and keeps
    its output format unless one is given now (`output_given`: --json-schema, --format, --regex).
    A `remote` chat (--url) is rendered by the server's template: it records none but a resumed chat's own.
    """
    settings = resolved.settings
    conversation = store.latest() if latest else store.load(ref) if ref is not None else None  # '': no such id
    if conversation is None:
        conversation = Conversation(system=settings.system)
    else:
        if conversation.model and resolved.sources["model"] == "default":
            settings = replace(settings, model=conversation.model)
            if resolved.sources["chat_template"] == "default":
                settings = replace(settings, chat_template=conversation.chat_template)
        if resolved.sources["system"] != "default":
            conversation.system = settings.system
        for key in list(conversation.sampling):
            if resolved.sources.get(f"sampling.{key}") == "flag":
                del conversation.sampling[key]
    if remote:  # a template from a config file or the environment is not used, so not recorded either
        settings = replace(settings, chat_template=conversation.chat_template)
    if output_given:
        conversation.output = output
    elif conversation.output is not None:  # checked before the model loads, as the flags are
        where = f"conversation {conversation.id}: its output format"  # named too where the vocabulary refuses it
        conversation.output = replace(conversation.output, where=where)
        check(conversation.output, where)
    if Path(settings.model).expanduser().exists():  # a folder or file: remember where, for a later --resume
        settings = replace(settings, model=str(Path(settings.model).expanduser().resolve()))
    conversation.model = settings.model
    if settings.chat_template:  # its absolute path, for a later --resume from another folder
        settings = replace(settings, chat_template=str(Path(settings.chat_template).expanduser().resolve()))
    conversation.chat_template = settings.chat_template
    return with_output(settings, conversation.output), conversation
