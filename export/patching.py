"""Everything an export changes for tracing, in one named context (as optimum's ModelPatcher).

`export_patches(model, target)` yields a private copy of the model with the target's
export-only switches on, and keeps the target's tool fixes (`Target.tool_patches`, e.g. the
coremltools op-registry fix) in force for its duration. On exit, error or not, both are undone.

The copy shares the weights (`EdgeTalkModel.for_streaming`, no memory) but not the modules, so
the model the pipeline keeps as its parity reference is never switched, not even briefly: a
reference that samples the way the exported graph does would hide the difference the gate is
there to measure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..converters.target import Target
from ..models.edgetalk import EdgeTalkModel


@contextlib.contextmanager
def export_patches(model: EdgeTalkModel, target: Target) -> Iterator[EdgeTalkModel]:
    twin = model.for_streaming(model.cfg).eval()
    decoder = twin.decoder
    native = decoder.native_sampling
    # gather form: the same bilinear sampling as grid_sample, in ops every runtime has
    decoder.native_sampling = not target.gather_sampling
    try:
        with target.tool_patches():
            yield twin
    finally:
        decoder.native_sampling = native
