"""RTCP sender reports on the media clock: the one place EdgeTalk patches aiortc's RTP sender.

A browser syncs audio to video with each track's RTCP sender reports: an (NTP, RTP) pair saying
when on the sender's wall clock a given RTP timestamp was sampled (RFC 3550, 6.4.1). aiortc pairs
the RTP timestamp of the last packet it sent with the time it sent it, which is right only while
every packet leaves exactly at its media time. The avatar's audio cannot always: when a busy
machine makes the Session drop or skip frames, their audio goes out with the next frame it
renders, 100-300 ms after its time, and a report taken then tells the browser that the sound was
sampled that much later than the picture. On a 2-core VM with Chromium beside the server, the
sound settled 85-100 ms behind the mouth with aiortc's reports and 35-45 ms with these.

Here the pair is the last packet's RTP timestamp and its *presentation* time: the track's media
base (monotonic wall time of timeline 0, which follows the Session's presentation clock) plus the
packet's timestamp over the codec's clock rate. A late packet is then only network jitter to the
receiver, which its jitter buffer absorbs, and both tracks' reports sit on one clock.

It relies on aiortc's private attribute `_RTCRtpSender__ntp_timestamp` (as in aiortc 1.16.0,
the version constraints.txt pins): a data property of the same name on a subclass takes every
assignment aiortc makes to it. `tests/test_serve_rtp_clock.py` runs a real sender and fails if
that stops being so.
"""

from __future__ import annotations

import functools
import time


def _ntp_at(monotonic_t: float) -> int:
    """A monotonic time as a 64-bit NTP timestamp (aiortc's wall clock for its reports)."""
    from aiortc.clock import current_ntp_time

    return current_ntp_time() - round((time.monotonic() - monotonic_t) * (1 << 32))


def media_clock_sender(sender) -> None:
    """Make this aiortc RTCRtpSender report its track's presentation clock (see module doc).

    The track must expose `media_base`: the monotonic time of its timeline 0 for the frame it
    returned last, or None while it has none (the sender then keeps aiortc's own report).
    """
    from aiortc import RTCRtpSender

    if type(sender) is not RTCRtpSender:
        raise TypeError(f"expected an aiortc RTCRtpSender, got {type(sender).__name__}")
    sender.__class__ = _sender_class()


@functools.cache
def _sender_class():
    """The subclass, built on first use (aiortc is an optional dependency)."""
    from aiortc import RTCRtpSender

    class MediaClockSender(RTCRtpSender):
        _media_s: float | None = None  # the last encoded frame's timestamp, in seconds

        async def _next_encoded_frame(self, codec):
            enc = await super()._next_encoded_frame(codec)
            if enc is not None:
                # The frame's own timestamp: before aiortc adds its random origin.
                self._media_s = enc.timestamp / codec.clockRate
            return enc

        # aiortc assigns this after sending each packet (the send time) and reads it for the
        # sender report; the setter puts the packet's presentation time in its place.
        @property
        def _RTCRtpSender__ntp_timestamp(self) -> int:  # noqa: N802 (aiortc's mangled name)
            return self.__dict__.get("_media_clock_ntp", 0)

        @_RTCRtpSender__ntp_timestamp.setter
        def _RTCRtpSender__ntp_timestamp(self, value: int) -> None:  # noqa: N802
            base = getattr(self.track, "media_base", None)
            if base is not None and self._media_s is not None:
                value = _ntp_at(base + self._media_s)
            self.__dict__["_media_clock_ntp"] = value

    return MediaClockSender
