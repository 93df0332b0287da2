"""Checkpoints: safetensors with the config in metadata; anything else is refused, never unpickled."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from edgetalk.errors import BundleError, InputError
from edgetalk.models.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from edgetalk.models.config import ModelConfig, preset

from .conftest import MICRO, seeded_model


def test_round_trip(tmp_path):
    model = seeded_model(MICRO, seed=4)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, trained="false")
    loaded, meta = load_checkpoint(path)
    assert loaded.cfg == MICRO and meta["trained"] == "false"
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_config_dict_round_trip():
    for name in ("tiny", "large"):
        cfg = preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


class Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_payload_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(BundleError, match="not a safetensors checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_plain_safetensors_without_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(BundleError, match="not an EdgeTalk checkpoint"):
        read_metadata(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_weights_for_another_config_are_refused(tmp_path):
    model = seeded_model(MICRO)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.pop(next(iter(state)))
    save_file(state, str(path), metadata=read_metadata(path))
    with pytest.raises(BundleError, match="do not match"):
        load_checkpoint(path)
    # Every tensor present, one of another shape (e.g. weights of an older decoder layout).
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["decoder.refine_out.bias"] = state["decoder.refine_out.bias"][:4].clone()
    save_file(state, str(path), metadata=read_metadata(path))
    with pytest.raises(BundleError, match="do not match.*refine_out"):
        load_checkpoint(path)


def test_streaming_overrides():
    cfg = preset("tiny").with_streaming(chunk=1, window=6)
    assert (cfg.chunk, cfg.generator.window, cfg.cache_slots) == (1, 6, 7)
    with pytest.raises(ValueError, match="lookahead"):
        preset("tiny").with_streaming(lookahead_ms=80)
    assert preset("tiny").with_streaming(lookahead_ms=60) == preset("tiny")
    with pytest.raises(ValueError):
        preset("tiny").with_streaming(chunk=0)
    assert preset("tiny").lookahead_samples == 960 and preset("tiny").lookahead_ms == 60


@pytest.mark.parametrize("name", ["tiny", "large"])
def test_the_shape_only_model_has_every_tensor_of_the_real_one(name):
    """check_model_size vets a config on a model built on the meta device; its tables (DFT, mel
    filters, grids, upsampling) are empty placeholders there, of the real ones' shapes."""
    from edgetalk.models.edgetalk import EdgeTalkModel

    cfg = preset(name)
    with torch.device("meta"):
        shell = EdgeTalkModel(cfg)
    real = EdgeTalkModel(cfg)
    shapes = {k: tuple(t.shape) for k, t in real.named_buffers()}
    assert shapes == {k: tuple(t.shape) for k, t in shell.named_buffers()}
    assert {k: tuple(t.shape) for k, t in shell.named_parameters()} == {
        k: tuple(t.shape) for k, t in real.named_parameters()
    }
    assert all(t.is_meta for t in shell.buffers())  # nothing allocated for a config's tables


def test_opening_a_checkpoint_does_not_import_torch_dynamo():
    """On the meta device even torch.arange runs torch's Python reference ops, whose first use
    imports torch._dynamo: 1.4 s of every command that opens a checkpoint (`run` took 7.4 s on
    the README's first command, 4.6 s without it). A fresh interpreter, so the test has teeth."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from edgetalk.models.checkpoint import default_checkpoint, load_checkpoint\n"
        "load_checkpoint(default_checkpoint())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
