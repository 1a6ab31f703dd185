"""`sluice up`'s stack runs the webhook sender: a job's event reaches a receiver, signed."""

from __future__ import annotations

from pathlib import Path

from standardwebhooks import Webhook

from tests.e2e.conftest import start_stack
from tests.webhooks.receivers import receiver
from tests.webhooks.test_delivery import SECRET

H = {"Authorization": "Bearer local"}


def test_the_stack_delivers_job_events(tmp_path: Path) -> None:
    env = {
        "SLUICE_AUTH": "off",
        "SLUICE_WEBHOOK_SECRET": SECRET,
        "SLUICE_WEBHOOK_ALLOWLIST": "127.0.0.0/8",
        "SLUICE_WEBHOOK_POLL": "0.1",
    }
    with receiver() as rec:
        stack = start_stack("sqlite", tmp_path, **env)
        run = next(stack)
        try:
            assert "webhooks" in run.stack.names
            body = {"prompt": "stack says hi", "max_tokens": 3, "webhook_url": rec.url}
            r = run.http.post("/v1/jobs", json=body, headers=H)
            assert r.status_code == 202, r.text
            [call] = rec.wait_calls(1, timeout=60)
            event = Webhook(SECRET).verify(call.body, call.headers)
            assert event["type"] == "job.completed"
            assert event["data"]["job"]["output"] == "stack says hi"
        finally:
            stack.close()
