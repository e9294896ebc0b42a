"""Names that end up in NATS subjects and file paths: request ids and node names."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def checked_token(value: str, what: str) -> str:
    """value, when it is a plain token (no dots, wildcards, slashes or spaces); else ValueError."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} is not a valid token (letters, digits, _ and -)")
    return value
