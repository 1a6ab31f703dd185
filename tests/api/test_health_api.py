"""Health, readiness and models over real HTTP; answers when Redis or the database is down."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import redis

from sluice.config import Settings
from sluice.redis_server import shutdown_embedded, socket_path, unix_url
from tests.api.helpers import Api, error_of

# Nothing listens on port 1: connections are refused at once.
DEAD_REDIS = "redis://127.0.0.1:1/0"
DEAD_DATABASE = "postgresql://nobody@127.0.0.1:1/none"


def test_healthz_and_readyz_without_a_worker(api: Api) -> None:
    # Liveness says nothing about dependencies; readiness needs a worker for the model
    # (tests/test_status.py shows it turn ready with a real worker process, and back).
    assert api.http.get("/healthz").json() == {"status": "ok"}
    ready = api.http.get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["down"] == ["workers"]
    assert body["checks"]["database"] == "ok" and body["checks"]["redis"] == "ok"
    assert api.model in body["checks"]["workers"]
    assert f"no live worker serves {api.model!r}" in body["error"]["message"]
    assert body["error"]["code"] == "service_unavailable"
    assert int(ready.headers["retry-after"]) > 0


def test_readyz_without_the_worker_requirement(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    # SLUICE_READY_REQUIRES_WORKER=false: workers scaled to zero keep the API in rotation.
    with start_api(ready_requires_worker=False) as alone:
        ready = alone.http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_models_lists_the_accepted_models(api: Api) -> None:
    listed = api.http.get("/v1/models").json()
    assert listed == {
        "object": "list",
        "data": [
            {
                "id": api.model,
                "object": "model",
                "created": 0,
                "owned_by": "sluice",
                "root": api.model,
            }
        ],
    }
    assert api.http.get(f"/v1/models/{api.model}").json()["id"] == api.model
    missing = api.http.get("/v1/models/gpt-9")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "model_not_found"


def test_unknown_route_and_method_use_the_error_shape(api: Api) -> None:
    assert error_of(api.http.get("/v1/nothing-here"))["code"] == "not_found"
    response = api.http.delete("/v1/batches")
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"


def test_redis_down_readyz_503_but_submissions_are_kept(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(redis_url=DEAD_REDIS) as broken:
        ready = broken.http.get("/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["down"] == ["redis"]
        assert body["checks"]["database"] == "ok"
        # Workers are known only through Redis: not counted down a second time.
        assert body["checks"]["workers"] == "unknown (redis is down)"
        assert "redis" in body["error"]["message"]

        # The row is committed before publishing: the job exists and the reconciler will
        # publish it later.
        response = broken.http.post("/v1/jobs", json={"prompt": "still here"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert broken.http.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        # A long-poll without Redis answers with the current state instead of failing.
        waited = broken.http.get(f"/v1/jobs/{job_id}", params={"wait": 5})
        assert waited.status_code == 200 and waited.json()["status"] == "queued"
        cancelled = broken.http.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_database_down_readyz_503(start_api: Callable[..., AbstractContextManager[Api]]) -> None:
    with start_api(database_url=DEAD_DATABASE) as broken:
        ready = broken.http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["down"] == ["database", "workers"]
        assert ready.json()["checks"]["redis"] == "ok"


def test_without_a_redis_url_the_api_starts_the_embedded_one(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    started: list[Settings] = []
    try:
        with start_api(redis_url=None, ready_requires_worker=False) as embedded:
            started.append(embedded.settings)
            assert embedded.http.get("/readyz").status_code == 200
            assert embedded.http.post("/v1/jobs", json={"prompt": "hi"}).status_code == 202
            client = redis.Redis.from_url(unix_url(socket_path(embedded.settings.data_dir)))
            try:
                assert client.llen(f"sluice.{embedded.model}.interactive") == 1
            finally:
                client.close()
    finally:
        # Detached on purpose (workers share it): it outlives the API, so stop it here.
        for settings in started:
            assert shutdown_embedded(settings)
