"""The one backend interface: run a module on named numpy arrays, get named numpy arrays back.

Backends know nothing about streaming; the scheduler owns every piece of state. Each backend is
one file named `backend_<name>.py` in `runtime/` or `runtime_cuda/` that sets `BACKEND = <class>`;
`backends.py` discovers them, so a new backend touches no other file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..models.config import ModelConfig
from ..models.io_spec import ModuleIO

if TYPE_CHECKING:
    from .bundle import Bundle


class Backend(ABC):
    name: ClassVar[str]
    # Bundle targets this backend can execute, e.g. ("onnx",). "torch" runs checkpoints.
    targets: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: ModelConfig, io: dict[str, ModuleIO], precision: str = "fp32"):
        self.cfg = cfg
        self.io = io
        self.precision = precision

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(can run here, reason if not). Cheap: imports only, no model loading."""
        return True, ""

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Backend:
        raise NotImplementedError(f"backend {cls.name!r} does not load bundles")

    @abstractmethod
    def run(self, module: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one module. Inputs and outputs are bound by name, per `self.io[module]`."""

    def describe(self) -> str:
        return f"{self.name} ({self.precision})"
