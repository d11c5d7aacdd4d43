"""Request signing between peers with the fleet secret.

A request carries `Authorization: DATAFS-HMAC t=<unix seconds>,s=<hex>` where
the signature is HMAC-SHA256 over the method, the path and that time. A
server accepts it only within `SKEW_SECONDS` of its own clock, so a captured
request is useless a minute later; comparisons are constant-time. The secret
itself never travels, never appears in logs, metrics or status.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SCHEME = "DATAFS-HMAC"
SKEW_SECONDS = 30


def _mac(secret: bytes, method: str, path: str, timestamp: int) -> str:
    message = f"{method.upper()}\n{path}\n{timestamp}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, path: str, now: float | None = None) -> str:
    """The Authorization header value for one request."""
    timestamp = int(time.time() if now is None else now)
    return f"{SCHEME} t={timestamp},s={_mac(secret, method, path, timestamp)}"


def verify(secret: bytes, method: str, path: str, header: str | None, now: float | None = None) -> bool:
    if not header or not header.startswith(SCHEME + " "):
        return False
    try:
        fields = dict(part.split("=", 1) for part in header[len(SCHEME) + 1:].split(","))
        timestamp = int(fields["t"])
        signature = fields["s"]
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > SKEW_SECONDS:
        return False
    return hmac.compare_digest(signature, _mac(secret, method, path, timestamp))
