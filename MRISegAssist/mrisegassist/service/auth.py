"""Access rules shared by the segmentation server and the browser front end: loopback binding and access tokens.

A server binds ``127.0.0.1`` by default. Bound to any other address it requires an access token
(:func:`access_token_for` generates one when none is given); a token given on loopback is honoured too.
Tokens are compared in constant time (:func:`token_matches`).
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
from typing import Optional

from ..errors import InputError

DEFAULT_HOST = "127.0.0.1"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``::1`` (brackets and a ``:port`` suffix allowed)."""
    host = (host or "").strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_token_for(host: str, token: Optional[str]) -> tuple[Optional[str], bool]:
    """The token a server bound to ``host`` requires: ``(token, generated)``.

    On loopback a given token is honoured and none is required otherwise; on any other address a token is
    required, so one is generated (``secrets.token_urlsafe``) when none is given.
    """
    if token is not None:
        token = token.strip()
        if len(token) < 8:
            raise InputError("the access token must have at least 8 characters")
        return token, False
    if is_loopback(host):
        return None, False
    return secrets.token_urlsafe(24), True


def token_matches(expected: Optional[str], candidate: Optional[str]) -> bool:
    """Constant-time comparison; with no expected token everything matches."""
    if expected is None:
        return True
    if not candidate:
        return False
    return hmac.compare_digest(expected.encode(), candidate.encode())
