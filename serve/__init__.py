"""`edgetalk serve`: a web page that talks to an avatar over WebRTC.

aiohttp serves the page (serve/static/) and the signalling (POST /offer, JSON endpoints for
stats, interrupt and avatar upload); aiortc carries the media. The browser's microphone goes in as
a WebRTC audio track, is resampled to 16 kHz mono and fed to the same `edgetalk.Session` that
`edgetalk live` drives; the session's frames go out as a video track plus the audio track of the
frames being shown, on one timeline. Needs the `serve` extra: pip install 'edgetalk[serve]'.
"""
