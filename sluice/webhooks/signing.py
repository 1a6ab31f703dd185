"""Standard Webhooks signatures: `whsec_` secrets, `v1,<base64 HMAC-SHA256>` headers."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

PREFIX = "whsec_"
# Standard Webhooks asks for 24 to 64 bytes of key; fewer is too easy to guess.
MIN_SECRET_BYTES = 16


def parse_secret(secret: str) -> bytes:
    """The key bytes of a `whsec_<base64>` secret; ValueError saying what is wrong."""
    if not secret.startswith(PREFIX):
        raise ValueError("a webhook secret looks like whsec_<base64>")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"a webhook secret holds at least {MIN_SECRET_BYTES} bytes of key")
    return key


def parse_secrets(value: str) -> list[bytes]:
    """Comma-separated secrets (rotation: the new one and the old ones), as keys."""
    return [parse_secret(s.strip()) for s in value.split(",") if s.strip()]


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of `id.timestamp.body`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three webhook headers; one signature per key, space-separated (rotation)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(k, msg_id, timestamp, body) for k in keys),
    }
