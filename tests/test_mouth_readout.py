"""The mouth readout (models/mouth_readout.py): a linear map from normalized log-mels and the audio
encoder's own-voice features to the mouth, fitted to real video (and espeak), that the scheduler mixes into the shown mouth in speech. Its streaming form
must equal the offline features it is fitted on, it must be in every backend's contract only when
the config has one, and it must leave silence to the generator."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgetalk.models.checkpoint import default_checkpoint, load_checkpoint, save_checkpoint
from edgetalk.models.config import ModelConfig
from edgetalk.models.io_spec import module_io
from edgetalk.models.motion import MOUTH
from edgetalk.runtime.backend_torch import TorchBackend
from edgetalk.runtime.scheduler import MOUTH_INDEX, StreamScheduler

from .conftest import MICRO, need, seeded_model, speechlike


def with_readout(cfg: ModelConfig, mix: float = 1.0) -> ModelConfig:
    return dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, readout_mix=mix))


def readout_model(cfg: ModelConfig, seed: int = 0, mix: float = 1.0):
    """seeded_model(cfg, seed) with a readout of random weights: every other weight the same."""
    from edgetalk.models.edgetalk import EdgeTalkModel

    model = EdgeTalkModel(with_readout(cfg, mix))
    missing, unexpected = model.load_state_dict(
        seeded_model(cfg, seed=seed).state_dict(), strict=False
    )
    assert not unexpected and all(k.startswith("audio.readout.") for k in missing)
    g = torch.Generator().manual_seed(seed + 7)
    lin = model.audio.readout.linear
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
    return model


def envelope_clip(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """3 s of speech-like sound and labels whose jaw follows its loudness envelope."""
    from edgetalk.training.metrics import loudness_db

    pcm = speechlike(3.0, seed=seed)
    n = len(pcm) // 640
    motion = np.zeros((n, 16), np.float32)
    loud = loudness_db(pcm, n)
    motion[:, MOUTH_INDEX[0]] = np.clip((loud - loud.max() + 30) / 30, 0, 1)  # jaw_open
    return pcm, motion


def stream_mouth(model, chunk: int, pcm: np.ndarray) -> np.ndarray:
    """The readout's mouth [T, 5] as the scheduler's audio calls return it, chunk by chunk."""
    backend = TorchBackend(model, model.cfg.with_streaming(chunk=chunk))
    seen = []
    run = backend.run

    def tap(module, inputs):
        out = run(module, inputs)
        if module == "audio":
            seen.append(out["mouth"][0])
        return out

    backend.run = tap
    res = model.cfg.render.resolution
    sched = StreamScheduler(backend, np.zeros((res, res, 3), np.uint8))
    sched.push_audio(pcm)
    sched.flush()
    return np.concatenate(seen)[: len(pcm) // 640]


def test_contract_has_the_readout_only_when_configured():
    plain = module_io(MICRO)["audio"]
    assert "mouth" not in plain.output_names and "readout_norm" not in plain.input_names
    io = module_io(with_readout(MICRO))["audio"]
    assert {"readout_norm", "readout_hist"} <= set(io.input_names)
    assert {"mouth", "mouth_weight", "readout_norm_out", "readout_hist_out"} <= set(io.output_names)
    mouth = next(t for t in io.outputs if t.name == "mouth")
    assert mouth.shape == (1, MICRO.chunk, len(MOUTH))


def test_streaming_equals_the_offline_features_it_is_fitted_on():
    """Every chunk size gives the same mouth, and it is the linear map of the very features the
    fitting tool reads (training/fit_readout.readout_inputs: log-mels, the gated running mean, 3
    frames before and 1 after, then the encoder's own-voice features of a whole-clip pass), past
    the first frames (the offline pad repeats the edge)."""
    from edgetalk.training import fit_readout

    cfg = ModelConfig()  # the probe reads the tiny front end
    model = readout_model(cfg).eval()
    pcm = speechlike(1.2, seed=3)
    got = {c: stream_mouth(model, c, pcm) for c in (1, 4)}
    np.testing.assert_allclose(got[1], got[4], atol=1e-4)
    frames = len(pcm) // 640
    (feats,) = fit_readout.readout_inputs(model.audio, [("c", pcm, np.zeros((frames, 16)))])
    lin = model.audio.readout.linear
    want = feats @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
    np.testing.assert_allclose(got[4][3:-2], want[3:-2], atol=2e-3)
    # the encoder's features count: the same map without them is another mouth
    mel_only = (
        feats[:, : -cfg.audio.hidden]
        @ lin.weight.detach().double().numpy()[:, : -cfg.audio.hidden].T
    )
    assert np.abs(mel_only + lin.bias.detach().double().numpy() - want)[3:-2].max() > 1e-2


def test_silence_is_left_to_the_generator_and_speech_to_the_readout():
    model = readout_model(MICRO, mix=1.0).eval()
    plain = TorchBackend(seeded_model(MICRO).eval())  # same generator weights, no readout
    res = MICRO.render.resolution
    pcm = np.concatenate([np.zeros(16000, np.float32), speechlike(1.0, seed=1)])
    shown = {}
    for name, backend in (("readout", TorchBackend(model)), ("plain", plain)):
        sched = StreamScheduler(backend, np.zeros((res, res, 3), np.uint8), seed=5)
        rows = []
        for i in range(0, len(pcm), 640 * MICRO.chunk):
            if sched.push_audio(pcm[i : i + 640 * MICRO.chunk]):
                rows.append(sched.last_motion.copy())
        shown[name] = np.concatenate(rows)
    silent = slice(0, 20)  # the first 0.8 s: digital silence
    np.testing.assert_allclose(
        shown["readout"][silent][:, MOUTH_INDEX], shown["plain"][silent][:, MOUTH_INDEX], atol=1e-3
    )
    other = [i for i in range(shown["plain"].shape[1]) if i not in MOUTH_INDEX]
    np.testing.assert_allclose(shown["readout"][:, other], shown["plain"][:, other], atol=1e-5)
    speech = slice(30, 45)
    assert np.abs(shown["readout"][speech] - shown["plain"][speech])[:, MOUTH_INDEX].max() > 0.05


def test_mix_moves_the_shown_mouth_toward_the_readout_by_the_voice_gate():
    """shown = generator's + mix * gate * (readout - generator's), on the mouth only."""
    pcm = speechlike(1.0, seed=2)
    res = MICRO.render.resolution

    def run(model):
        backend = TorchBackend(model.eval())
        audio = []
        run_ = backend.run

        def tap(module, inputs):
            o = run_(module, inputs)
            if module == "audio":
                audio.append(o)
            return o

        backend.run = tap
        sched = StreamScheduler(backend, np.zeros((res, res, 3), np.uint8), seed=1)
        sched.push_audio(pcm)
        return sched.last_motion.copy(), audio[-1]

    gen, _ = run(seeded_model(MICRO))
    for mix in (0.5, 1.0):
        shown, audio = run(readout_model(MICRO, mix=mix))
        w = mix * audio["mouth_weight"][0][:, None]
        readout = np.clip(audio["mouth"][0], 0.0, 1.0)  # the motion's range
        want = gen[:, MOUTH_INDEX] + w * (readout - gen[:, MOUTH_INDEX])
        np.testing.assert_allclose(shown[:, MOUTH_INDEX], want, atol=1e-5)
        assert np.all((w >= 0) & (w <= mix))
    # a readout far outside [0, 1] (jaw -3, spread +3): the shown mouth stays inside, where the
    # decoder was trained, and leans on the range's ends in speech
    model = readout_model(MICRO, mix=1.0)
    with torch.no_grad():
        model.audio.readout.linear.bias[:2] = torch.tensor([-3.0, 3.0])
    shown, audio = run(model)
    assert audio["mouth"][0][:, 0].max() < -1 and audio["mouth"][0][:, 1].min() > 2
    lo = np.minimum(gen[:, MOUTH_INDEX], 0.0) - 1e-6
    hi = np.maximum(gen[:, MOUTH_INDEX], 1.0) + 1e-6
    assert np.all((shown[:, MOUTH_INDEX] >= lo) & (shown[:, MOUTH_INDEX] <= hi))
    w = audio["mouth_weight"][0]
    assert w.max() > 0.5  # speech: the readout leads


def test_checkpoint_round_trip_keeps_the_readout(tmp_path):
    model = readout_model(MICRO, mix=0.8)
    path = tmp_path / "r.safetensors"
    save_checkpoint(model, path)
    loaded, _ = load_checkpoint(path)
    assert loaded.cfg.audio.readout_mix == pytest.approx(0.8)
    torch.testing.assert_close(
        loaded.audio.readout.linear.weight, model.audio.readout.linear.weight
    )


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "1"])
def test_config_refuses_a_bad_mix(bad):
    with pytest.raises(ValueError, match="readout_mix"):
        with_readout(MICRO, bad).validate()


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("target", "precision"), [("onnx", "fp32"), ("onnx", "fp16"), ("mlx", "fp32")]
)
def test_exports_carry_the_readout(tmp_path, target, precision):
    """ONNX (the FP16 pass keeps the readout float) and the MLX port pass their parity gates,
    the mouth output among them, and stream through the scheduler."""
    need("onnxruntime", "the onnx extra is not installed")
    if target == "mlx":
        need("mlx.core", "mlx is not importable (the mlx extra)")
    from edgetalk.export.pipeline import export_bundle
    from edgetalk.runtime.loader import open_backend

    ck = tmp_path / "micro.safetensors"
    save_checkpoint(readout_model(MICRO, seed=4), ck)
    r = export_bundle(target, precision, checkpoint=ck, out=tmp_path / "b", progress=False)
    par = r.manifest["parity"]["audio"]
    assert par["status"] == "pass" and "mouth" in par["outputs"], par
    assert par["outputs"]["mouth"].get("gated", True)
    backend = open_backend(bundle=r.path)
    res = MICRO.render.resolution
    sched = StreamScheduler(backend, np.zeros((res, res, 3), np.uint8))
    frames = sched.push_audio(speechlike(0.6, seed=1)) + sched.flush()
    assert len(frames) == 15


@pytest.mark.parametrize("extra", [[], ["--clip-norm"]])
def test_fit_readout_learns_a_mouth_from_labels(tmp_path, extra):
    """Clips whose jaw follows the speech envelope: the fitted readout follows it on a clip it
    did not fit, streamed through the scheduler; held-out label files are not fitted on. With
    --clip-norm (each clip's mouth in its own units) as well, and the weights say so."""
    from edgetalk.training import fit_readout

    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(3):
        pcm, motion = envelope_clip(10 + i)
        np.savez(labels / f"c{i}.npz", audio=pcm, motion=motion, held_out=np.array(False))
    pcm, motion = envelope_clip(20)
    # a held-out file whose labels are wrong on purpose: fitting on it would spoil the map
    np.savez(labels / "h.npz", audio=pcm, motion=-motion, held_out=np.array(True))
    out = tmp_path / "r.safetensors"
    assert (
        fit_readout.main(["--labels", str(labels), "--out", str(out), "--lam", "100", *extra]) == 0
    )
    model, meta = load_checkpoint(out)
    assert ("standardized per clip" in meta["readout"]) == bool(extra)
    assert model.cfg.audio.readout_mix == 1.0
    _, base_meta = load_checkpoint(default_checkpoint())
    assert meta["trained"] == base_meta["trained"] and "ridge" in meta["readout"]  # history kept
    test_pcm, test_motion = envelope_clip(30)
    got = stream_mouth(model.eval(), 4, test_pcm)[:, 0]
    want = test_motion[: len(got), MOUTH_INDEX[0]]
    assert np.corrcoef(got[5:], want[5:])[0, 1] > 0.6


def test_fit_maps_weighs_each_set_by_its_share_not_its_size():
    """Two sets that disagree (the second 9x larger): a set's share decides whom the map follows."""
    from edgetalk.training.fit_readout import fit_maps

    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(100, 3)), rng.normal(size=(900, 3))
    y1, y2 = np.zeros((100, 16)), np.zeros((900, 16))
    y1[:, MOUTH_INDEX[0]] = x1[:, 0]  # set 1: the jaw follows feature 0
    y2[:, MOUTH_INDEX[0]] = x2[:, 1]  # set 2: feature 1
    for share, lead in ((0.9, 0), (0.1, 1)):
        w, _ = fit_maps([[x1], [x2]], [[y1], [y2]], lam=1.0, shares=[share, 1 - share])
        assert np.argmax(np.abs(w[0])) == lead
        assert abs(w[0, lead]) > 2 * abs(w[0, 1 - lead])


def test_jaw_spread_widens_the_jaw_about_its_mean_and_nothing_else():
    """fit_readout --jaw-spread S: the jaw's predictions are S times as far from their mean (the
    decoder's dead zone, MODEL_CARD.md "The jaw's spread"); the other mouth maps are unchanged."""
    from edgetalk.training.fit_readout import fit_maps

    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 4))
    y = np.zeros((400, 16))
    y[:, MOUTH_INDEX] = x[:, :1] * 0.1 + rng.normal(scale=0.05, size=(400, 5)) + 0.3
    w1, b1 = fit_maps([[x]], [[y]], lam=10.0, shares=[1.0])
    w2, b2 = fit_maps([[x]], [[y]], lam=10.0, shares=[1.0], jaw_spread=1.5)
    p1, p2 = x @ w1.T + b1, x @ w2.T + b2
    np.testing.assert_allclose(p2[:, 0] - p2[:, 0].mean(), 1.5 * (p1[:, 0] - p1[:, 0].mean()))
    assert p2[:, 0].mean() == pytest.approx(p1[:, 0].mean())
    np.testing.assert_allclose(p2[:, 1:], p1[:, 1:])


def test_fit_readout_score_measures_clips_it_did_not_fit(tmp_path, capsys):
    """--score: the held-out labels are read only to score the fit. Correct held-out labels score
    high, the same labels in shuffled order low, and nothing is written without --out."""
    from edgetalk.training import fit_readout

    def held_out_score(shuffled: bool) -> float:
        labels = tmp_path / f"labels{int(shuffled)}"
        labels.mkdir()
        for i in range(3):
            pcm, motion = envelope_clip(10 + i)
            np.savez(labels / f"c{i}.npz", audio=pcm, motion=motion, held_out=np.array(False))
        pcm, motion = envelope_clip(20)
        if shuffled:
            motion = np.random.default_rng(0).permutation(motion)
        np.savez(labels / "h.npz", audio=pcm, motion=motion, held_out=np.array(True))
        assert fit_readout.main(["--labels", str(labels), "--score", "--lam", "100"]) == 0
        line = [s for s in capsys.readouterr().out.splitlines() if "label-level" in s][0]
        assert "CV needs --real DIR" in line
        return float(line.split("held-out identities ")[1].split(",")[0].split()[0])

    assert held_out_score(False) > 0.6
    assert held_out_score(True) < 0.4
    assert not list(tmp_path.rglob("*.safetensors"))
    with pytest.raises(SystemExit, match="--out"):
        fit_readout.main(["--labels", str(tmp_path / "labels0")])


def test_identity_folds_keep_each_person_in_one_fold():
    from edgetalk.training.fit_readout import identity_folds

    ids = ["a1", "a2", "b1", "c1", "c2", "c3", "d1", "e1", "f1", "g1"]
    identity = {i: i[0] for i in ids}
    folds = identity_folds(ids, identity, k=5)
    assert len(folds) == 5
    assert sorted(j for f in folds for j in f) == list(range(len(ids)))
    for person in "abcdefg":
        holding = [f for f in folds if any(identity[ids[j]] == person for j in f)]
        assert len(holding) == 1
