"""Our signatures verify with the `standardwebhooks` package, and only when untouched."""

from __future__ import annotations

import base64
import json
import time

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from sluice.webhooks.signing import headers, parse_secret, parse_secrets

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 32).decode()
BODY = json.dumps({"id": "evt_1", "object": "event", "type": "batch.completed"}).encode()


def _signed(secret: str = SECRET, ts: int | None = None, body: bytes = BODY) -> dict[str, str]:
    return headers([parse_secret(secret)], "msg_1", ts or int(time.time()), body)


def test_verifies_with_standardwebhooks() -> None:
    assert Webhook(SECRET).verify(BODY, _signed())["type"] == "batch.completed"


def test_tampered_body_is_rejected() -> None:
    signed = _signed()
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY.replace(b"completed", b"cancelled"), signed)


def test_wrong_secret_is_rejected() -> None:
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER).verify(BODY, _signed())


@pytest.mark.parametrize("offset", [-360, 360])
def test_timestamp_six_minutes_off_is_rejected(offset: int) -> None:
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY, _signed(ts=int(time.time()) + offset))


def test_rotation_signs_with_every_secret() -> None:
    h = headers(parse_secrets(f"{SECRET}, {OTHER}"), "msg_1", int(time.time()), BODY)
    assert len(h["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, OTHER):
        Webhook(secret).verify(BODY, h)


@pytest.mark.parametrize(
    "bad", ["k" * 40, "whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()]
)
def test_bad_secrets_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="webhook secret"):
        parse_secret(bad)
