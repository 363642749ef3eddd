"""API tokens: how they look, how they are stored, and whether one still holds.

A token is ``flt_`` and 43 URL-safe characters (256 random bits). Only its SHA-256 is stored: a
database dump yields no usable credential, and with a secret that long no salt or slow hash is needed.
The prefix lets secret scanners (and :func:`redact`) find a token pasted into the wrong place.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from fleetloop_cloud.identity.roles import Role

PREFIX = "flt_"
#: Random bytes in a token's secret.
SECRET_BYTES = 32
_TOKEN = re.compile(r"flt_[A-Za-z0-9_-]{20,}")
#: Token names: what ``tokens list`` and the audit log show; never secret.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison of two stored hashes."""
    return hmac.compare_digest(a.encode(), b.encode())


def check_name(name: str) -> str:
    """A token's name, or ValueError saying what a name may be."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"token name {name!r}: 1-64 characters, letters, digits and . _ @ -, starting with a letter "
            "or digit"
        )
    return name


def redact(text: str) -> str:
    """``text`` with anything that looks like a token replaced: for log lines and error messages that
    may echo what a client sent."""
    return _TOKEN.sub("flt_***", text)


@dataclass(frozen=True)
class TokenState:
    """A stored token as the authentication decision needs it."""

    name: str
    role: Role
    expires_at: float | None
    revoked_at: float | None


def refusal(token: TokenState | None, now: float) -> str | None:
    """Why this token may not be used now (``unknown``, ``revoked``, ``expired``), or None if it may."""
    if token is None:
        return "unknown"
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and now >= token.expires_at:
        return "expired"
    return None
