"""What the routes share: the engine, the tokenizer, the served model's name, defaults and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gptcli.config import SamplingConfig
from gptcli.server.engine_bridge import EngineLike
from gptcli.server.errors import APIError
from gptcli.server.metrics import Metrics
from gptcli.tokenizer import Tokenizer

DEFAULT_ALIAS = "default"


@dataclass
class ServerState:
    engine: EngineLike
    tokenizer: Tokenizer
    model_name: str
    context_length: int
    defaults: SamplingConfig = field(default_factory=SamplingConfig)
    created: int = 0
    metrics: Metrics = field(default_factory=Metrics)

    def check_model(self, requested: str | None) -> None:
        """One model is served; it answers to its name and to 'default' (404 otherwise)."""
        if requested in (None, "", DEFAULT_ALIAS, self.model_name):
            return
        raise APIError(
            404,
            f"the model '{requested}' does not exist: this server serves '{self.model_name}'",
            param="model",
            code="model_not_found",
        )

    @property
    def max_model_len(self) -> int:
        """The most positions one request may hold, prompt and reply together: the model's context, or the KV
        budget where --kv-budget is smaller (what a request can never pass, as vLLM's max_model_len never passes
        its KV cache). Clients plan by it: summarize --url cuts its chunks to it, chat --url its window."""
        return min(self.context_length, self.engine.kv_budget)

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "gptcli",
            "max_model_len": self.max_model_len,
            # gptcli's own: without a template, a client sends a prompt as text to complete (as a local run
            # does), not as a chat message the server would frame as a "User:" / "Assistant:" transcript
            "has_chat_template": bool(self.tokenizer.chat_template),
        }
