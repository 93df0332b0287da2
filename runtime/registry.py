"""Backend discovery: every `backend_*.py` in runtime/ and runtime_cuda/ that sets BACKEND.

Modules are imported only when needed: opening an ONNX bundle imports the onnxruntime backend,
not torch through the torch and CUDA backends. A backend called `x-y` lives in `backend_x_y.py`,
which lets `lookup` go straight to its file; the full scan stays the fallback.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from functools import cache

from ..errors import EXTRAS, BackendUnavailable
from .backend import Backend

PACKAGES = ("edgetalk.runtime", "edgetalk.runtime_cuda")


@cache
def _module_names() -> tuple[str, ...]:
    names = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith("backend_"):
                names.append(f"{pkg_name}.{info.name}")
    return tuple(names)


# A backend whose module needs a package that is not installed (torch for the torch backend on a
# bundle-only install) is listed as unavailable, saying which extra to install (errors.EXTRAS).


@cache
def _load(module: str) -> type[Backend] | None:
    try:
        return getattr(importlib.import_module(module), "BACKEND", None)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if not missing or missing == "edgetalk":
            raise
        return _missing(module, missing)


def _missing(module: str, package: str) -> type[Backend]:
    extra = EXTRAS.get(package, package)
    backend_name = module.rsplit(".", 1)[1].removeprefix("backend_").replace("_", "-")
    why = f"{package} is not installed (pip install 'edgetalk[{extra}]')"
    if backend_name == "torch":
        why += "; an exported bundle (--bundle) runs without it"

    class Missing(Backend):
        name = backend_name
        targets = ()

        @classmethod
        def availability(cls):
            return False, why

        def run(self, module, inputs):  # never opened: availability is False
            raise BackendUnavailable(why)

    return Missing


def _classes() -> Iterator[type[Backend]]:
    """Backend classes in discovery order, each module imported when reached."""
    for module in _module_names():
        cls = _load(module)
        if cls is not None:
            yield cls


def registry() -> dict[str, type[Backend]]:
    """Every backend, by name (imports them all)."""
    return {cls.name: cls for cls in _classes()}


def lookup(name: str) -> tuple[type[Backend], bool, str]:
    """(class, can run here, why not). Unknown names raise BackendUnavailable."""
    for module in _module_names():
        if module.rsplit(".", 1)[1] == "backend_" + name.replace("-", "_"):
            cls = _load(module)
            if cls is not None and cls.name == name:
                ok, why = cls.availability()
                return cls, ok, why
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
    return [cls for cls in _classes() if target in cls.targets]


def backend_for_target(target: str) -> type[Backend]:
    """The first backend that can run bundles of this target here (the manifest picks it)."""
    reasons = []
    for cls in _classes():  # stops at the first that runs here: later modules stay unimported
        if target not in cls.targets:
            continue
        ok, why = cls.availability()
        if ok:
            return cls
        reasons.append(f"{cls.name}: {why}")
    if not reasons:
        raise BackendUnavailable(f"no backend runs {target!r} bundles")
    raise BackendUnavailable(f"no backend can run this {target} bundle here ({'; '.join(reasons)})")
