"""Model aliases (SLUICE_MODEL_ALIASES) and /v1/models over real HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from sqlalchemy import select

from sluice.config import load_settings
from sluice.errors import ConfigError
from sluice.models import requests
from tests.api.helpers import Api, batch_line, jsonl

MODEL = f"llama-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def aliased(start_api: Callable[..., AbstractContextManager[Api]]) -> Iterator[Api]:
    """An API serving MODEL, also known as gpt-4o-mini and gpt-4o."""
    with start_api(model=MODEL, model_aliases=f"gpt-4o-mini={MODEL}, gpt-4o={MODEL}") as api:
        yield api


def test_models_lists_the_served_model_and_its_aliases(aliased: Api) -> None:
    listed = aliased.http.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [(m["id"], m["root"]) for m in listed["data"]] == [
        (MODEL, MODEL),
        ("gpt-4o-mini", MODEL),
        ("gpt-4o", MODEL),
    ]
    one = aliased.http.get("/v1/models/gpt-4o-mini")
    assert one.status_code == 200
    assert one.json()["root"] == MODEL


def test_unknown_model_says_which_exist(aliased: Api) -> None:
    for response in (
        aliased.http.get("/v1/models/gpt-9"),
        aliased.http.post("/v1/jobs", json={"model": "gpt-9", "prompt": "hi"}),
    ):
        assert response.status_code == 404, response.text
        err = response.json()["error"]
        assert err["code"] == "model_not_found"
        assert err["param"] == "model"
        assert f"available: {MODEL}, gpt-4o-mini, gpt-4o" in err["message"]


def test_a_job_naming_an_alias_runs_as_the_served_model(aliased: Api) -> None:
    response = aliased.http.post("/v1/jobs", json={"model": "gpt-4o-mini", "prompt": "hi there"})
    assert response.status_code == 202, response.text
    assert response.json()["model"] == MODEL
    with aliased.db.read() as conn:
        models = conn.execute(
            select(requests.c.model).where(requests.c.batch_id == response.json()["id"])
        ).all()
    assert [m[0] for m in models] == [MODEL]


def test_a_batch_file_naming_an_alias_queues_for_the_served_model(aliased: Api) -> None:
    content = jsonl([batch_line(f"a{i}", "gpt-4o-mini") for i in range(3)])
    file_id = aliased.upload(content).json()["id"]
    created = aliased.http.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert created.status_code == 200, created.text
    batch = created.json()
    assert batch["status"] != "failed", batch["errors"]
    assert batch["model"] == MODEL
    with aliased.db.read() as conn:
        models = conn.execute(
            select(requests.c.model).where(requests.c.batch_id == batch["id"])
        ).all()
    assert [m[0] for m in models] == [MODEL] * 3


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("gpt-4o-mini", "is not alias=model"),
        ("gpt-4o-mini=nope", "names a model not served here"),
        ("a=sluice-echo,a=sluice-echo", "given twice"),
        ("sluice-echo=sluice-echo", "served model's own name"),
    ],
)
def test_bad_aliases_stop_the_start(spec: str, says: str) -> None:
    with pytest.raises(ConfigError, match="SLUICE_MODEL_ALIASES") as caught:
        load_settings(model="sluice-echo", model_aliases=spec)
    assert says in str(caught.value)
