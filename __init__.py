"""EdgeTalk: one face photo plus a live audio stream in, a live talking-head video out."""

__version__ = "0.1.0"
