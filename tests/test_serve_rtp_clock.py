"""serve/rtp_clock.py: RTCP sender reports pair RTP time with presentation time, not send time.

A real aiortc sender and receiver on loopback. The audio track sends its 20 ms frames late by
amounts that grow during the stream (as audio carried past dropped frames is late), and the test
reads the sender reports the receiver gets. Each says "RTP timestamp R was sampled at NTP time N";
on the media clock N - R / 48000 is the same for every report (timeline 0 plus aiortc's random
RTP origin), however late the packets left. aiortc's own reports move with the lateness: the
control run shows that the test can tell them apart.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import numpy as np
import pytest

pytest.importorskip("aiortc")

from aiortc import (  # noqa: E402
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
)
from aiortc.rtp import RtcpSrPacket  # noqa: E402

from edgetalk.serve.rtp_clock import media_clock_sender  # noqa: E402

RATE = 48_000
FRAME = RATE // 50


class LateAudio(MediaStreamTrack):
    """20 ms frames of a tone; each leaves later than its time by 15% of its time (audio falling
    behind, as on a machine that drops frames): 150 ms more for every second of the stream."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self.media_base: float | None = None
        self.k = 0

    async def recv(self):
        import av

        if self.media_base is None:
            self.media_base = time.monotonic()
        due = self.media_base + self.k * FRAME / RATE
        late = 0.15 * self.k * FRAME / RATE
        wait = due + late - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (self.k * FRAME + np.arange(FRAME)) / RATE
        pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self.k * FRAME
        frame.time_base = fractions.Fraction(1, RATE)
        self.k += 1
        return frame


async def _sender_reports(patch: bool, seconds: float) -> list[tuple[float, int]]:
    """(NTP seconds, RTP timestamp) of every sender report the receiving peer got."""
    a = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    b = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    reports: list[tuple[float, int]] = []
    try:
        sender = a.addTrack(LateAudio())
        if patch:
            media_clock_sender(sender)

        @b.on("track")
        def on_track(track):
            receiver = next(r for r in b.getReceivers() if r.track is track)
            handle = receiver._handle_rtcp_packet

            async def spy(packet):
                if isinstance(packet, RtcpSrPacket):
                    info = packet.sender_info
                    reports.append((info.ntp_timestamp / 2**32, info.rtp_timestamp))
                return await handle(packet)

            receiver._handle_rtcp_packet = spy

            async def drain():  # the receiver must read its track for media to flow
                while True:
                    await track.recv()

            asyncio.ensure_future(drain())

        await a.setLocalDescription(await a.createOffer())
        await b.setRemoteDescription(a.localDescription)
        await b.setLocalDescription(await b.createAnswer())
        await a.setRemoteDescription(b.localDescription)
        await asyncio.sleep(seconds)
    finally:
        await a.close()
        await b.close()
    return reports


def _origins(reports: list[tuple[float, int]]) -> np.ndarray:
    """NTP time minus RTP time, in ms, for each report (constant on the media clock)."""
    ntp = np.array([n for n, _ in reports])
    rtp = np.unwrap(np.array([r for _, r in reports], float), period=2**32)
    return (ntp - rtp / RATE) * 1000.0


@pytest.mark.timeout(60)
def test_sender_reports_follow_the_media_clock_not_the_send_time():
    patched = _origins(asyncio.run(_sender_reports(patch=True, seconds=7.0)))
    control = _origins(asyncio.run(_sender_reports(patch=False, seconds=7.0)))
    print(
        f"\nsender reports: patched {len(patched)}, spread {np.ptp(patched):.1f} ms; "
        f"aiortc's own {len(control)}, spread {np.ptp(control):.1f} ms"
    )
    assert len(patched) >= 3 and len(control) >= 3, (patched, control)
    # Presentation time: one line whatever the lateness (rounding and clock reads only).
    assert np.ptp(patched) < 15.0, patched
    # Send time: the growing lateness shows (reports are >= 0.5 s apart: >= 75 ms a pair).
    assert np.ptp(control) > 60.0, control


def test_only_an_aiortc_sender_is_patched():
    with pytest.raises(TypeError, match="RTCRtpSender"):
        media_clock_sender(object())
    track = LateAudio()
    from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
    from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport

    async def make():
        transport = RTCDtlsTransport(
            RTCIceTransport(RTCIceGatherer()), [RTCCertificate.generateCertificate()]
        )
        sender = RTCRtpSender(track, transport)
        media_clock_sender(sender)
        assert isinstance(sender, RTCRtpSender) and type(sender) is not RTCRtpSender
        # Before any frame: aiortc's value passes through unchanged.
        sender._RTCRtpSender__ntp_timestamp = 12345
        assert sender._RTCRtpSender__ntp_timestamp == 12345
        with pytest.raises(TypeError):  # not twice
            media_clock_sender(sender)

    asyncio.run(make())
