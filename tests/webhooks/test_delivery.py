"""Delivery through real receivers and a real database: signatures, retries with the same
webhook-id, 410, timeouts, 429 Retry-After, redirects, and two senders sending once."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from sluice.config import Settings, load_settings
from sluice.db import Database
from sluice.ids import now
from sluice.store import work
from sluice.store.batches import create_job
from sluice.store.deliveries import claim, deliveries_of, enable_endpoint
from sluice.webhooks.sender import Sender, backoff
from tests.webhooks.receivers import Answer, receiver

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
MODEL = "hooktest"


def settings_for(database_url: str, tmp: Path, **over: Any) -> Settings:
    """Tiny backoffs and polls: retries happen in tens of milliseconds."""
    values: dict[str, Any] = {
        "data_dir": tmp,
        "database_url": database_url,
        "webhook_secret": SECRET,
        "webhook_allowlist": "127.0.0.0/8",
        "webhook_backoff_base": 0.05,
        "webhook_backoff_max": 0.2,
        "webhook_poll": 0.02,
        "webhook_timeout": 2.0,
        "webhook_retry_for": 30.0,
        **over,
    }
    return load_settings(**values)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    d = Database(database_url)
    yield d
    d.dispose()


@contextmanager
def sending(settings: Settings, db: Database, owner: str = "s1") -> Iterator[Sender]:
    sender = Sender(settings, db, owner=owner)
    sender.start()
    try:
        yield sender
    finally:
        sender.stop()


def finished_job(db: Database, url: str, output_ok: bool = True) -> str:
    """A job with a webhook URL, run to its end through the worker's own SQL."""
    created = create_job(
        db, owner="default", endpoint="/v1/completions", model=MODEL,
        body={"model": MODEL, "prompt": "hi"}, webhook_url=url,
    )  # fmt: skip
    claimed = work.claim(db, created.request_ids, "w1", 60)
    status = "succeeded" if output_ok else "failed"
    result = work.Result(
        claimed[0].id, status, output_text="hello" if output_ok else None,
        finish_reason="stop" if output_ok else None,
        error_code=None if output_ok else "engine_error",
        error_message=None if output_ok else "boom", finished_at=now(),
    )  # fmt: skip
    assert work.write_results(db, "w1", [result]) == [created.batch_id]
    return created.batch_id


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def log(db: Database, batch_id: str) -> tuple[Any, list[Any]]:
    [(delivery, attempts)] = deliveries_of(db, batch_id)
    return delivery, attempts


def test_job_events_are_signed_and_carry_the_result(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    settings = settings_for(database_url, tmp_path)
    with receiver() as rec, sending(settings, db):
        ok = finished_job(db, rec.url)
        bad = finished_job(db, rec.url, output_ok=False)
        calls = rec.wait_calls(2)
    events = {}
    for call in calls:
        event = Webhook(SECRET).verify(call.body, call.headers)
        assert event["object"] == "event" and event["id"] == call.headers["webhook-id"]
        events[event["data"]["id"]] = event
    assert events[ok]["type"] == "job.completed"
    assert events[ok]["data"]["job"]["output"] == "hello"
    assert events[bad]["type"] == "job.failed"
    assert events[bad]["data"]["job"]["error"]["code"] == "engine_error"
    wait_until(lambda: log(db, ok)[0]["status"] == "succeeded")


def test_500_three_times_then_delivered_with_the_same_webhook_id(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    settings = settings_for(database_url, tmp_path)
    script = lambda n: Answer(500 if n <= 3 else 200)  # noqa: E731
    with receiver(script) as rec, sending(settings, db):
        job = finished_job(db, rec.url)
        calls = rec.wait_calls(4)
        wait_until(lambda: log(db, job)[0]["status"] == "succeeded")
    assert len({c.headers["webhook-id"] for c in calls}) == 1
    delivery, attempts = log(db, job)
    assert [a["status_code"] for a in attempts] == [500, 500, 500, 200]
    assert [a["outcome"] for a in attempts] == ["retrying"] * 3 + ["succeeded"]
    assert delivery["attempts"] == 4
    for c in calls:  # each retry is signed afresh, and verifies
        Webhook(SECRET).verify(c.body, c.headers)


def test_410_disables_the_endpoint(db: Database, database_url: str, tmp_path: Path) -> None:
    settings = settings_for(database_url, tmp_path)
    with receiver(lambda n: Answer(410 if n == 1 else 200)) as rec, sending(settings, db):
        first = finished_job(db, rec.url)
        rec.wait_calls(1)
        wait_until(lambda: log(db, first)[0]["status"] == "failed")
        second = finished_job(db, rec.url)
        wait_until(lambda: log(db, second)[0]["status"] == "failed")
        assert len(rec.calls) == 1  # the second event was never sent
        # `sluice webhooks --enable URL`: the receiver is back, new events reach it.
        assert enable_endpoint(db, rec.url) and not enable_endpoint(db, rec.url)
        third = finished_job(db, rec.url)
        rec.wait_calls(2)
        wait_until(lambda: log(db, third)[0]["status"] == "succeeded")
    assert log(db, first)[1][0]["outcome"] == "disabled"
    [never] = log(db, second)[1]
    assert never["outcome"] == "disabled" and never["status_code"] is None
    assert "410" in never["error"]


def test_a_slow_receiver_times_out(db: Database, database_url: str, tmp_path: Path) -> None:
    settings = settings_for(database_url, tmp_path, webhook_timeout=0.3, webhook_retry_for=0.5)
    with receiver(lambda _n: Answer(200, delay=10)) as rec, sending(settings, db):
        job = finished_job(db, rec.url)
        wait_until(lambda: log(db, job)[0]["status"] == "failed")
    _, attempts = log(db, job)
    assert attempts and all("timed out" in a["error"] for a in attempts)
    assert "gave up" in attempts[-1]["error"]
    assert all(a["duration_ms"] < 3000 for a in attempts)


def test_429_retry_after_is_honoured(db: Database, database_url: str, tmp_path: Path) -> None:
    settings = settings_for(database_url, tmp_path)
    script = lambda n: Answer(429, {"Retry-After": "1"}) if n == 1 else Answer(200)  # noqa: E731
    with receiver(script) as rec, sending(settings, db):
        job = finished_job(db, rec.url)
        calls = rec.wait_calls(2)
        wait_until(lambda: log(db, job)[0]["status"] == "succeeded")
    # Backoff alone would retry within 0.2 s.
    assert calls[1].at - calls[0].at >= 0.95


def test_a_redirect_is_a_failure_and_not_followed(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    settings = settings_for(database_url, tmp_path, webhook_retry_for=0.3)
    with receiver() as target:
        hop = lambda _n: Answer(302, {"Location": target.url})  # noqa: E731
        with receiver(hop) as rec, sending(settings, db):
            job = finished_job(db, rec.url)
            wait_until(lambda: log(db, job)[0]["status"] == "failed")
        assert target.calls == []
    _, attempts = log(db, job)
    assert attempts[0]["status_code"] == 302 and "not followed" in attempts[0]["error"]


def test_two_senders_send_each_event_once(db: Database, database_url: str, tmp_path: Path) -> None:
    settings = settings_for(database_url, tmp_path, webhook_concurrency=4)
    with receiver() as rec:
        jobs = [finished_job(db, rec.url) for _ in range(30)]
        with sending(settings, db, "a"), sending(settings, db, "b"):
            rec.wait_calls(30)
            wait_until(lambda: all(log(db, j)[0]["status"] == "succeeded" for j in jobs))
        ids = [c.headers["webhook-id"] for c in rec.calls]
    assert len(ids) == len(set(ids)) == 30
    assert {json.loads(c.body)["data"]["id"] for c in rec.calls} == set(jobs)


def test_a_dead_senders_lease_runs_out_and_another_delivers(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    settings = settings_for(database_url, tmp_path)
    with receiver() as rec:
        job = finished_job(db, rec.url)
        # A sender claims it and dies before sending: nobody else may take it meanwhile.
        [held] = claim(db, "dead", 10, lease_seconds=1.0)
        assert claim(db, "other", 10, lease_seconds=1.0) == []
        with sending(settings, db, "alive"):
            [call] = rec.wait_calls(1)
            wait_until(lambda: log(db, job)[0]["status"] == "succeeded")
    assert call.headers["webhook-id"] == held.id
    assert log(db, job)[1][0]["attempt"] == 1


def test_backoff_grows_exponentially_with_jitter() -> None:
    for attempt in range(1, 12):
        ceiling = min(3600.0, 5.0 * 2 ** (attempt - 1))
        samples = {backoff(attempt, 5.0, 3600.0) for _ in range(50)}
        assert all(ceiling / 2 <= s <= ceiling for s in samples)
        assert len(samples) > 40  # jittered, not one fixed delay
