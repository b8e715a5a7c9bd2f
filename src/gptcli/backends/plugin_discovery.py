"""Which plugins are installed (the `gptcli.backends` entry points) and which GPTCLI_PLUGINS lets load.

Reading entry points imports no plugin; the registry (gptcli.backends.base) builds its list from these.
"""

from __future__ import annotations

import os
from typing import Any

ENTRY_POINT_GROUP = "gptcli.backends"
PLUGINS_ENV = "GPTCLI_PLUGINS"


def plugin_filter() -> set[str] | None:
    """GPTCLI_PLUGINS=none|name,...: which plugins may load (unset, empty or "all": every one)."""
    value = os.environ.get(PLUGINS_ENV)
    if value is None or value.strip() in {"", "all"}:
        return None
    if value.strip() == "none":
        return set()
    return {v.strip() for v in value.split(",") if v.strip()} or None  # "," names none: as unset, not "none"


def plugin_entry_points() -> list[Any]:
    """Every `gptcli.backends` entry point, one per (distribution, name); reading them imports no plugin."""
    from importlib import metadata  # ~10 ms to import: only where plugins are looked for

    seen: set[tuple[str, str]] = set()
    points = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        key = (dist.name if dist is not None else "", ep.name)
        if key not in seen:  # a distribution found twice on sys.path is still one plugin
            seen.add(key)
            points.append(ep)
    return points


def plugin_filter_warning() -> str | None:
    """What to tell a user whose GPTCLI_PLUGINS names a plugin that is not installed (a typo there hides
    every plugin silently), or None."""
    allowed = plugin_filter()
    if not allowed:
        return None
    installed = sorted({ep.name for ep in plugin_entry_points()})
    unmatched = sorted(allowed - set(installed))
    if not unmatched:
        return None
    from gptcli.coercion import suggest

    names = ", ".join(f"'{name}'{suggest(name, installed)}" for name in unmatched)
    return (
        f"{PLUGINS_ENV} names {names}, which no installed plugin has"
        f" (installed plugins: {', '.join(installed) or 'none'})"
    )
