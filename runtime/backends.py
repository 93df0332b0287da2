"""Backend discovery: every `backend_*.py` in runtime/ and runtime_cuda/ that sets BACKEND."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from ..errors import BackendUnavailable
from .backend import Backend

PACKAGES = ("edgetalk.runtime", "edgetalk.runtime_cuda")


@cache
def registry() -> dict[str, type[Backend]]:
    found: dict[str, type[Backend]] = {}
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("backend_"):
                continue
            mod = importlib.import_module(f"{pkg_name}.{info.name}")
            cls = getattr(mod, "BACKEND", None)
            if cls is not None:
                found[cls.name] = cls
    return found


def lookup(name: str) -> tuple[type[Backend], bool, str]:
    """(class, can run here, why not). Unknown names raise BackendUnavailable."""
    reg = registry()
    if name not in reg:
        raise BackendUnavailable(
            f"unknown backend {name!r}; known backends: {', '.join(sorted(reg))}"
        )
    cls = reg[name]
    ok, why = cls.availability()
    return cls, ok, why


def backend_class(name: str) -> type[Backend]:
    cls, ok, why = lookup(name)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {why}")
    return cls


def backends_for_target(target: str) -> list[type[Backend]]:
    return [cls for cls in registry().values() if target in cls.targets]


def backend_for_target(target: str) -> type[Backend]:
    """The first backend that can run bundles of this target here (the manifest picks it)."""
    candidates = backends_for_target(target)
    if not candidates:
        raise BackendUnavailable(f"no backend runs {target!r} bundles")
    reasons = []
    for cls in candidates:
        ok, why = cls.availability()
        if ok:
            return cls
        reasons.append(f"{cls.name}: {why}")
    raise BackendUnavailable(f"no backend can run this {target} bundle here ({'; '.join(reasons)})")
