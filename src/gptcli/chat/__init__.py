"""Chat: conversations and their store, a session over a loaded model, and the slash commands.

`gptcli.cli.chat_cmd` reads lines and renders events; everything else about a chat lives here.
"""

from gptcli.chat.commands import (
    COMMANDS,
    CommandResult,
    Step,
    collect_message,
    dispatch,
    help_text,
    is_command,
    run_command,
    show_text,
    stats_text,
)
from gptcli.chat.conversation import (
    Conversation,
    ConversationStore,
    chats_dir,
    new_id,
    read_conversation_file,
    to_markdown,
    write_conversation_file,
)
from gptcli.chat.session import SAMPLING_KEYS, ChatSession, Turn, parse_setting

__all__ = [
    "COMMANDS",
    "SAMPLING_KEYS",
    "ChatSession",
    "CommandResult",
    "Conversation",
    "ConversationStore",
    "Step",
    "Turn",
    "chats_dir",
    "collect_message",
    "dispatch",
    "help_text",
    "is_command",
    "new_id",
    "parse_setting",
    "read_conversation_file",
    "run_command",
    "show_text",
    "stats_text",
    "to_markdown",
    "write_conversation_file",
]
