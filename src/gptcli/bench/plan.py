"""What a benchmark runs: the configuration matrix (backend × precision × threads), checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptcli.errors import BackendError

# Backends known to honour LoadOptions.precision even if they do not declare `precisions`.
PRECISION_AWARE = {"onnx"}


@dataclass(frozen=True)
class Config:
    """One column of the comparison: a backend at a precision with a thread count."""

    backend: str
    precision: str
    threads: int
    honours_precision: bool = True


@dataclass
class Plan:
    configs: list[Config]
    unavailable: list[tuple[str, str]] = field(default_factory=list)  # (backend, reason)


def declared_precisions(backend_cls: type) -> tuple[str, ...] | None:
    value = getattr(backend_cls, "precisions", None)
    if value is not None:
        return tuple(value)
    return None


def plan_configs(
    backends: list[str] | None,
    precisions: list[str],
    threads: list[int],
    device: str,
) -> Plan:
    """Check every backend before anything runs. Unknown names are an error (exit 4); a backend that
    cannot run here is reported with its reason and skipped, unless none is left."""
    from gptcli.backends.base import get_backend_class, list_backends, unavailable_reason

    registered = list(dict.fromkeys(s.name for s in list_backends() if not s.conflict))
    for name in backends or []:
        if name not in registered:
            get_backend_class(name)  # raises the registry's own error: unknown, or a plugin turned off
    plan = Plan([])
    for name in backends or registered:
        try:
            backend_cls = get_backend_class(name)
            reason = unavailable_reason(backend_cls, f"backend '{name}'", device)
        except BackendError as exc:  # a plugin that fails to import or to answer is unavailable, not fatal
            reason = exc.message
        if reason:
            plan.unavailable.append((name, reason))
            continue
        declared = declared_precisions(backend_cls)
        honours = declared is not None or name in PRECISION_AWARE
        usable = [p for p in precisions if declared is None or p in declared]
        if declared is not None and not usable:
            plan.unavailable.append((name, f"supports precisions {', '.join(declared)} only"))
            continue
        # A backend that ignores --precision (torch: --dtype decides) runs once per thread count.
        for precision in usable if honours else usable[:1]:
            for count in threads:
                plan.configs.append(Config(name, precision, count, honours))
    if not plan.configs:
        detail = "; ".join(f"{n}: {r}" for n, r in plan.unavailable) or "no backend is registered"
        raise BackendError(f"no backend can run here ({detail})", hint="`gptcli backends` lists what can run here")
    return plan
