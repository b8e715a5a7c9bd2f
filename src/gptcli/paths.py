"""Where gptcli keeps its cache, config and data. Every location can be moved with an env var."""

from __future__ import annotations

import os
from pathlib import Path


def _platform_dir(kind: str) -> Path:
    import platformdirs

    getter = {
        "cache": platformdirs.user_cache_dir,
        "config": platformdirs.user_config_dir,
        "data": platformdirs.user_data_dir,
    }[kind]
    return Path(getter("gptcli"))


def home_dir() -> Path | None:
    """`$GPTCLI_HOME`, when set, holds cache/ and data/ together."""
    value = os.environ.get("GPTCLI_HOME")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    home = home_dir()
    return home / "cache" if home else _platform_dir("cache")


def models_dir() -> Path:
    return cache_dir() / "models"


def config_dir() -> Path:
    """The user config folder: $XDG_CONFIG_HOME/gptcli (GPTCLI_HOME does not move it)."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return Path(xdg).expanduser() / "gptcli" if xdg else _platform_dir("config")


def user_config_file() -> Path:
    return config_dir() / "config.yaml"


def data_dir() -> Path:
    home = home_dir()
    return home / "data" if home else _platform_dir("data")
