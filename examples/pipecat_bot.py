"""A Pipecat voice bot with an EdgeTalk face, served to the browser peer-to-peer (no cloud).

    pip install 'edgetalk[pipecat]'
    python examples/pipecat_bot.py                       # scripted lines, espeak-ng voice, offline
    OPENAI_API_KEY=... python examples/pipecat_bot.py --brain openai   # talk to it (STT, LLM, TTS)

Open http://127.0.0.1:7860/ and press Start. The page and the media come from this process:
Pipecat's SmallWebRTC transport (aiortc) talks to the browser directly, with no STUN server.

The pipeline is `transport.input() -> brain -> EdgeTalkVideoService -> transport.output()`.
The brain is whatever turns the user's voice into TTS audio, swappable:
- `scripted` (default, offline): speaks SCRIPT line by line with espeak-ng, each line after the
  bot has stopped speaking the last one plus a pause, round and round. The tests use it.
- `openai`: Silero VAD, OpenAI STT, LLM and TTS (needs OPENAI_API_KEY and the network).
Swap in any Pipecat STT / LLM / TTS services in `make_brain`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from aiohttp import web
from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    Frame,
    InterruptionFrame,
    StartFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from edgetalk.errors import EdgeTalkError
from edgetalk.integrations.pipecat import EdgeTalkVideoService, transport_params
from edgetalk.runtime.loader import open_backend

SCRIPT = [
    "Hello! I am a talking head that runs on this computer.",
    "My face is drawn from one photo, as I speak.",
    "Press interrupt, and I stop talking.",
]
TTS_PIECE_S = 0.02  # TTS audio goes out in 20 ms frames, as streaming TTS services send it


# ---- an offline TTS: espeak-ng ----------------------------------------------------------------------
class EspeakTTS(FrameProcessor):
    """Text (TextFrame / TTSSpeakFrame) -> espeak-ng speech as TTS frames (22.05 kHz mono)."""

    def __init__(self, voice: str = "en-us", rate_wpm: int = 165, **kwargs):
        super().__init__(**kwargs)
        if shutil.which("espeak-ng") is None:
            raise EdgeTalkError("espeak-ng is not installed (apt-get install espeak-ng)")
        self.voice, self.rate_wpm = voice, rate_wpm

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TextFrame | TTSSpeakFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._speak(frame.text)
        else:
            await self.push_frame(frame, direction)

    async def _speak(self, text: str) -> None:
        import soundfile as sf

        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "tts.wav"
            proc = await asyncio.create_subprocess_exec(
                "espeak-ng", "-v", self.voice, "-s", str(self.rate_wpm), "-w", str(wav), text
            )
            if await proc.wait() != 0:
                raise EdgeTalkError(f"espeak-ng failed on {text!r}")
            pcm, rate = sf.read(str(wav), dtype="int16")
        n = int(rate * TTS_PIECE_S)
        await self.push_frame(TTSStartedFrame())
        for i in range(0, pcm.shape[0], n):
            piece = np.ascontiguousarray(pcm[i : i + n])
            await self.push_frame(TTSAudioRawFrame(piece.tobytes(), rate, 1))
        await self.push_frame(TTSStoppedFrame())


class ScriptedReplies(FrameProcessor):
    """The offline brain: says the next SCRIPT line once the bot has stopped speaking the last
    one (BotStoppedSpeakingFrame comes upstream from the output transport) and `pause_s` passed."""

    def __init__(self, lines=SCRIPT, pause_s: float = 1.5, **kwargs):
        super().__init__(**kwargs)
        self.lines, self.pause_s = list(lines), pause_s
        self.spoken = 0
        self.bot_stopped_at: list[float] = []
        self._go = asyncio.Event()
        self._task = None

    def begin(self) -> None:
        """Start talking (on client connection)."""
        self._go.set()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self._task = self.create_task(self._talk())
        elif isinstance(frame, BotStoppedSpeakingFrame) and direction == FrameDirection.UPSTREAM:
            self.bot_stopped_at.append(time.time())
            self._go.set()
        await self.push_frame(frame, direction)

    async def cleanup(self):
        await super().cleanup()
        if self._task is not None:
            await self.cancel_task(self._task)
            self._task = None

    async def _talk(self) -> None:
        while True:
            await self._go.wait()
            self._go.clear()
            if self.spoken:
                await asyncio.sleep(self.pause_s)
            await self.push_frame(TTSSpeakFrame(self.lines[self.spoken % len(self.lines)]))
            self.spoken += 1


def make_brain(kind: str) -> tuple[list, list, object]:
    """(processors before the avatar, processors after the transport output, scripted brain)."""
    if kind == "scripted":
        replies = ScriptedReplies()
        return [replies, EspeakTTS()], [], replies
    if kind == "openai":
        from pipecat.audio.vad.silero import SileroVADAnalyzer
        from pipecat.processors.aggregators.llm_context import LLMContext
        from pipecat.processors.aggregators.llm_response_universal import (
            LLMContextAggregatorPair,
            LLMUserAggregatorParams,
        )
        from pipecat.services.openai.llm import OpenAILLMService
        from pipecat.services.openai.stt import OpenAISTTService
        from pipecat.services.openai.tts import OpenAITTSService

        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise EdgeTalkError("--brain openai needs OPENAI_API_KEY in the environment")
        context = LLMContext(
            [{"role": "system", "content": "You are a friendly avatar. Answer in one sentence."}]
        )
        user, assistant = LLMContextAggregatorPair(
            context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
        )
        stt, llm, tts = (
            OpenAISTTService(api_key=key),
            OpenAILLMService(api_key=key),
            OpenAITTSService(api_key=key),
        )
        return [stt, user, llm, tts], [assistant], None
    raise EdgeTalkError(f"unknown brain {kind!r} (scripted or openai)")


# ---- one browser connection = one pipeline -----------------------------------------------------------
class Bot:
    def __init__(self, connection: SmallWebRTCConnection, avatar: EdgeTalkVideoService, brain):
        before, after, self.replies = make_brain(brain)
        self.connection, self.avatar = connection, avatar
        self.transport = SmallWebRTCTransport(
            webrtc_connection=connection,
            params=TransportParams(
                audio_in_enabled=True,
                audio_out_enabled=True,
                **transport_params(),
            ),
        )
        pipeline = Pipeline(
            [self.transport.input(), *before, avatar, self.transport.output(), *after]
        )
        self.task = PipelineWorker(
            pipeline,
            params=PipelineParams(audio_out_sample_rate=48000),  # Opus's rate: no resampling
            enable_rtvi=False,
            idle_timeout_secs=None,
        )
        self.connected_at: float | None = None

        @self.transport.event_handler("on_client_connected")
        async def on_connected(transport, client):
            self.connected_at = time.time()
            if self.replies is not None:  # talk once the face is there
                await self.avatar.stream.start()
                self.replies.begin()

        @self.transport.event_handler("on_client_disconnected")
        async def on_disconnected(transport, client):
            await self.task.cancel()

    async def run(self) -> None:
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.task)
        await runner.run()

    async def interrupt(self) -> None:
        await self.task.queue_frame(InterruptionFrame())

    def stats(self) -> dict:
        st = self.avatar.stream
        s = st.session.stats if st.session is not None else None
        return {
            "connected_at": self.connected_at,
            "frames": st.frames_out,
            "fps": st.fps,
            "speech_delays_s": st.speech_delays,
            "first_tts_audio_at": self.avatar.first_tts_audio_at,
            "interruptions": None if s is None else s.interruptions,
            "late": None if s is None else s.late,
            "dropped": None if s is None else s.dropped,
            "lines_spoken": None if self.replies is None else self.replies.spoken,
            "bot_stopped_at": None if self.replies is None else self.replies.bot_stopped_at,
        }


def create_app(make_avatar, brain: str = "scripted") -> web.Application:
    """The page, `POST /api/offer` (SDP in, SDP out; starts a bot), `POST /api/interrupt`,
    `GET /api/stats`. `make_avatar()` returns a new EdgeTalkVideoService for each connection."""
    bots: dict[str, Bot] = {}
    app = web.Application()
    app["bots"] = bots

    async def page(request):
        return web.Response(text=PAGE, content_type="text/html")

    async def offer(request):
        body = await request.json()
        conn = SmallWebRTCConnection(ice_servers=[])
        await conn.initialize(sdp=body["sdp"], type=body["type"])
        bot = Bot(conn, make_avatar(), brain)
        bots[conn.pc_id] = bot

        async def run():
            try:
                await bot.run()
            finally:
                bots.pop(conn.pc_id, None)

        app.setdefault("tasks", set()).add(asyncio.create_task(run()))
        return web.json_response(conn.get_answer())

    def bot_of(request) -> Bot:
        bot = bots.get(request.query.get("pc_id", ""))
        if bot is None:
            raise web.HTTPNotFound(text="no such connection")
        return bot

    async def interrupt(request):
        await bot_of(request).interrupt()
        return web.json_response({"ok": True})

    async def stats(request):
        return web.json_response(bot_of(request).stats())

    async def shutdown(app):
        for bot in list(bots.values()):
            await bot.task.cancel()
        for t in app.get("tasks", ()):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(t, 10)

    app.router.add_get("/", page)
    app.router.add_post("/api/offer", offer)
    app.router.add_post("/api/interrupt", interrupt)
    app.router.add_get("/api/stats", stats)
    app.on_shutdown.append(shutdown)
    return app


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>EdgeTalk + Pipecat</title>
<style>body{font:15px system-ui;margin:2em}video{width:384px;height:384px;background:#222}</style>
</head><body>
<h1>EdgeTalk + Pipecat</h1>
<video id="video" autoplay playsinline></video>
<p><button id="start">Start</button> <button id="interrupt" disabled>Interrupt</button>
<span id="status">Ready.</span></p>
<script>
// One RTCPeerConnection: transceiver 0 audio (the microphone out, the bot's voice in),
// transceiver 1 video (the avatar in), as Pipecat's SmallWebRTC transport expects.
// With ?measure=1 it also logs each shown frame (time on screen, the brightness of two marker
// blocks at its top left) and the loudness of the sound as played, for the tests' measurements.
const measure = new URLSearchParams(location.search).has("measure");
const trace = { video: [], audio: [] };
window.edgetalk = { trace, pcId: null, shown: 0, firstShownAt: null };
const $ = (id) => document.getElementById(id);
const status = (t) => { $("status").textContent = t; };
const canvas = document.createElement("canvas");
canvas.width = 16;
canvas.height = 8;
const cx = canvas.getContext("2d", { willReadFrequently: true });

function onFrame(now, meta) {
  const video = $("video");
  const w = window.edgetalk;
  w.shown += 1;
  if (w.firstShownAt === null) w.firstShownAt = performance.timeOrigin + now;
  if (measure) {  // the means of two marker blocks (top-left, each 1/16 of the picture wide)
    cx.drawImage(video, 0, 0, video.videoWidth / 8, video.videoHeight / 16, 0, 0, 16, 8);
    const d = cx.getImageData(0, 0, 16, 8).data;
    const m = [0, 0];
    for (let i = 0; i < d.length; i += 4) m[(i / 4) % 16 < 8 ? 0 : 1] += d[i] / 64;
    trace.video.push([performance.timeOrigin + meta.expectedDisplayTime, m[0], m[1]]);
  }
  video.requestVideoFrameCallback(onFrame);
}

async function meter(track) {
  const code = `class M extends AudioWorkletProcessor { constructor(){super(); this.b=[];}
    process(inputs){ const x=inputs[0]; let s=0, n=0;
      if (x && x.length) for (const c of x) { for (const v of c) s += v*v; n += c.length; }
      this.b.push(currentFrame, n ? Math.sqrt(s/n) : 0);
      if (this.b.length >= 16) { this.port.postMessage(this.b); this.b = []; } return true; } }
    registerProcessor("m", M);`;
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([code], {type: "text/javascript"})));
  const node = new AudioWorkletNode(ctx, "m");
  const mute = ctx.createGain();
  mute.gain.value = 0;  // the video element plays the sound; this only measures it
  ctx.createMediaStreamSource(new MediaStream([track])).connect(node);
  node.connect(mute);
  mute.connect(ctx.destination);
  node.port.onmessage = (ev) => {
    const ts = ctx.getOutputTimestamp();
    const b = ev.data;
    for (let i = 0; i < b.length; i += 2) {
      const heard = ts.performanceTime + (b[i] / ctx.sampleRate - ts.contextTime) * 1000;
      trace.audio.push([performance.timeOrigin + heard, b[i + 1]]);
    }
  };
  await ctx.resume();
}

async function start() {
  $("start").disabled = true;
  status("Connecting…");
  const mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true } });
  const pc = new RTCPeerConnection({ iceServers: [] });
  const video = $("video");
  pc.ontrack = (ev) => {
    if (!video.srcObject) video.srcObject = new MediaStream();
    video.srcObject.addTrack(ev.track);
    if (ev.track.kind === "audio" && measure) meter(ev.track);
    video.play().catch(() => {});
  };
  pc.onconnectionstatechange = () => status(pc.connectionState);
  pc.addTransceiver(mic.getAudioTracks()[0], { direction: "sendrecv" });
  pc.addTransceiver("video", { direction: "sendrecv" });
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((ok) => {
    if (pc.iceGatheringState === "complete") return ok();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && ok();
    setTimeout(ok, 3000);
  });
  const r = await fetch("/api/offer", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }) });
  const answer = await r.json();
  window.edgetalk.pcId = answer.pc_id;
  await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
  video.requestVideoFrameCallback(onFrame);
  $("interrupt").disabled = false;
}

$("start").onclick = () => start().catch((e) => status("Could not start: " + e.message));
$("interrupt").onclick = () =>
  fetch("/api/interrupt?pc_id=" + encodeURIComponent(window.edgetalk.pcId), { method: "POST" });
</script></body></html>
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brain", default="scripted", choices=["scripted", "openai"])
    ap.add_argument("--avatar", help="a photo (default: the embedded avatar)")
    ap.add_argument("--bundle", help="an exported bundle (default: the shipped weights)")
    ap.add_argument("--checkpoint", help="a checkpoint (default: the shipped weights)")
    ap.add_argument("--backend", help="torch, onnxruntime, ... (default: from the model)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    args = ap.parse_args(argv)

    try:
        make_brain(args.brain)  # a missing key or espeak-ng: say so now, not per connection
        # One model for all connections (each gets its own Session on it), loaded up front.
        backend = open_backend(bundle=args.bundle, checkpoint=args.checkpoint, backend=args.backend)

        def make_avatar():
            return EdgeTalkVideoService(avatar=args.avatar, backend=backend, threads=args.threads)

        app = create_app(make_avatar, args.brain)
    except EdgeTalkError as e:
        print(f"pipecat_bot: error: {e}")
        return 2
    print(f"pipecat_bot: open http://{args.host}:{args.port}/ and press Start")
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
