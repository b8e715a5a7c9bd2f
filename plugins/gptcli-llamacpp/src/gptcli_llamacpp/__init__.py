"""gptcli-llamacpp: run GGUF models natively (quantised, no dequantisation) as a gptcli backend."""

__version__ = "0.1.0"
