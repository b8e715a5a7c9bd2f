"""gptcli: train, run, chat with and benchmark GPT-style language models."""

__version__ = "0.1.0"
