"""Shared secrets for `serve` and `live --listen`: where a token comes from, never the command line
alone (a `--token T` argument is visible to every user in `ps`)."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ..errors import InputError

TOKEN_ENV = "EDGETALK_TOKEN"
MAX_TOKEN_FILE_BYTES = 4096


def resolve_token(token: str | None, token_file: Path | None) -> str | None:
    """The token from --token, --token-file or the EDGETALK_TOKEN environment variable (in that
    order; at most one of the flags)."""
    if token is not None and token_file is not None:
        raise InputError("give --token or --token-file, not both")
    if token_file is not None:
        try:
            if token_file.stat().st_size > MAX_TOKEN_FILE_BYTES:
                raise InputError(f"--token-file {token_file} is too large for a token")
            text = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise InputError(f"cannot read --token-file {token_file}") from None
        if not text:
            raise InputError(f"--token-file {token_file} is empty")
        return text
    if token is not None:
        return token
    return os.environ.get(TOKEN_ENV) or None


def generate_token() -> str:
    return secrets.token_urlsafe(24)


def save_private(token: str, path: Path) -> Path:
    """Write a generated token to a file only its owner can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, stat.S_IRUSR | stat.S_IWUSR)
    except OSError as e:
        raise InputError(f"cannot save the generated token to {path}: {e.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return path


def masked(token: str) -> str:
    """Enough to tell tokens apart in a log line, not enough to use."""
    return token[:4] + "…" if len(token) > 8 else "…"
