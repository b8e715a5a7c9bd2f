"""Backends turn token ids into logits. See base.py for the protocol and the registry."""

from gptcli.backends.base import Backend, BackendSpec, LoadOptions, ModelInfo, get_backend_class, list_backends

__all__ = ["Backend", "BackendSpec", "LoadOptions", "ModelInfo", "get_backend_class", "list_backends"]
