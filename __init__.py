"""EdgeTalk: one face photo plus a live audio stream in, a live talking-head video out."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`edgetalk.Session` is imported on first use, so `import edgetalk` stays cheap."""
    if name == "Session":
        from .runtime.session import Session

        return Session
    raise AttributeError(f"module 'edgetalk' has no attribute {name!r}")
