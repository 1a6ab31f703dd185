"""HTTP hygiene over real HTTP: Host checked, no state change without a credential header
(even with auth off), /docs served from local files, no bound parameters in DB errors."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import httpx
import pytest
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from api.hygiene import host_allowed, host_of
from sluice.models import files
from tests.api.helpers import Api, batch_line, error_of, jsonl


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.2", "[::2]:80"])
def test_a_foreign_host_header_gets_400(api: Api, host: str) -> None:
    for method, path in (("GET", "/v1/files"), ("GET", "/docs"), ("POST", "/v1/jobs")):
        response = api.http.request(method, path, headers={"Host": host}, json={"prompt": "x"})
        assert response.status_code == 400, (host, path, response.text)
        assert error_of(response)["code"] == "invalid_host"
    # Probes come from orchestrators by address: any Host (they show no owner's data).
    assert api.http.get("/healthz", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:8000", "LOCALHOST", "[::1]:8000"])
def test_local_host_headers_are_served(api: Api, host: str) -> None:
    assert api.http.get("/v1/files", headers={"Host": host}).status_code == 200


def test_host_matching() -> None:
    assert host_of("[::1]:8000") == "::1" and host_of("Api.Example:443") == "api.example"
    assert host_allowed("a.example.com", ["*.example.com"])
    assert not host_allowed("example.com.evil", ["*.example.com"])
    assert not host_allowed("badexample.com", ["*.example.com"])
    assert host_allowed("anything", ["*"])


def test_trusted_hosts_setting_replaces_the_defaults(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(trusted_hosts="api.internal") as api:
        assert api.http.get("/v1/files", headers={"Host": "api.internal"}).status_code == 200
        assert api.http.get("/v1/files").status_code == 400  # 127.0.0.1 is no longer listed


def test_with_auth_off_a_credentialless_form_post_is_refused(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    """What a cross-site <form> can send (multipart, no Authorization) changes nothing."""
    with start_api(auth="off") as api, httpx.Client(base_url=api.url, timeout=30) as browser:
        form = browser.post(
            "/v1/files",
            files={"file": ("in.jsonl", jsonl([batch_line("a", api.model)]))},
            data={"purpose": "batch"},
        )
        assert form.status_code == 401, form.text
        assert form.json()["error"]["code"] == "missing_api_key"
        plain = browser.post(
            "/v1/jobs", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"}
        )
        assert plain.status_code == 401
        assert browser.get("/v1/files").json()["data"] == []
        # Any Authorization header will do with auth off (a browser cannot add one
        # cross-site without a preflight, which this API never grants).
        ok = browser.post("/v1/jobs", json={"prompt": "x"}, headers={"Authorization": "Bearer x"})
        assert ok.status_code == 202, ok.text
        assert "sluice-admin" in ok.headers  # auth off: every owner's rows are visible


def test_docs_page_loads_its_assets_from_this_server(api: Api) -> None:
    page = httpx.get(f"{api.url}/docs", timeout=30)
    assert page.status_code == 200
    assert "cdn." not in page.text and "unpkg" not in page.text
    assert "/docs-assets/swagger-ui-bundle.js" in page.text
    script = httpx.get(f"{api.url}/docs-assets/swagger-ui-bundle.js", timeout=30)
    assert script.status_code == 200 and len(script.content) > 100_000
    css = httpx.get(f"{api.url}/docs-assets/swagger-ui.css", timeout=30)
    assert css.status_code == 200 and "swagger-ui" in css.text
    assert httpx.get(f"{api.url}/redoc", timeout=30).status_code in (401, 404)


def test_database_errors_never_carry_bound_values(api: Api) -> None:
    """SQLAlchemy's hide_parameters: a prompt in a failing statement stays out of logs."""
    secret = "PROMPT-SECRET-42"
    row = {
        "id": "file-dup",
        "owner": "default",
        "purpose": "batch",
        "filename": secret,
        "line_count": 0,
        "bad_lines": 0,
        "created_at": 0,
    }
    with api.db.write() as conn:
        conn.execute(insert(files).values(**row))
    with pytest.raises(IntegrityError) as caught, api.db.write() as conn:
        conn.execute(insert(files).values(**row))
    assert secret not in str(caught.value)
    assert "hidden" in str(caught.value)
