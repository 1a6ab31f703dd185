"""docker-compose.yml's service commands, run natively (no Docker engine here) and checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from compose_spec import PyCompose

from sluice.config import load_settings
from sluice.db import Database
from sluice.queue import broker_url
from sluice.redis_server import ensure_redis
from sluice.scratch import scratch_database
from sluice.stack import free_port
from sluice.store.keys import create_key
from tests.e2e.conftest import PG_URL, REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _command(service: str) -> list[str]:
    cmd: list[str] = COMPOSE["services"][service]["command"]
    return list(cmd)


def _native(cmd: list[str], port: int | None = None, broker: str | None = None) -> list[str]:
    """The compose command with this host's addresses instead of the compose network's."""
    exe = {
        "sluice": [sys.executable, "-m", "sluice.cli"],
        "celery": [sys.executable, "-m", "celery"],
    }[cmd[0]]
    out = []
    for arg in cmd[1:]:
        if arg.startswith("--broker=") and broker:
            arg = f"--broker={broker}"
        elif arg.startswith("--port=") and port:
            arg = f"--port={port}"
        out.append(arg)
    if "--port" in out and port:
        out[out.index("--port") + 1] = str(port)
    if "--host" in out:
        out[out.index("--host") + 1] = "127.0.0.1"
    return exe + out


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The compose environment, pointed at this machine's database and Redis."""
    cleanup = ExitStack()
    if PG_URL and REDIS_URL:
        db_url = cleanup.enter_context(scratch_database(PG_URL, "sluice_test"))
        redis_url, handle = REDIS_URL, None
    else:
        db_url = f"sqlite:///{tmp_path / 'sluice.db'}"
        handle = ensure_redis(load_settings(data_dir=tmp_path))
        redis_url = handle.url
    compose_env = {k: str(v) for k, v in COMPOSE["x-sluice-env"].items()}
    assert set(compose_env) >= {"SLUICE_DATABASE_URL", "SLUICE_REDIS_URL"}
    values = {
        **os.environ,
        **compose_env,
        "SLUICE_DATABASE_URL": db_url,
        "SLUICE_REDIS_URL": redis_url,
        "SLUICE_DATA_DIR": str(tmp_path),
        # The compose worker serves vLLM on a GPU; this host has neither, so echo.
        "SLUICE_ENGINE": "echo",
        "SLUICE_MODEL": "sluice-echo",
    }
    yield values
    if handle:
        handle.stop()
    cleanup.close()


def test_compose_services_run_natively(env: dict[str, Any], tmp_path: Path) -> None:
    services = {"redis", "postgres", "migrate", "api", "worker", "webhooks", "flower"}
    assert services <= set(COMPOSE["services"])
    gpu = COMPOSE["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]

    migrate = subprocess.run(
        _native(_command("migrate")), env=env, capture_output=True, text=True, timeout=120
    )
    assert migrate.returncode == 0, migrate.stderr

    api_port, flower_port = free_port(), free_port()
    procs = []
    try:
        with (tmp_path / "services.log").open("ab") as log:
            running = [("api", api_port), ("worker", None), ("webhooks", None)]
            running.append(("flower", flower_port))
            for service, port in running:
                cmd = _native(_command(service), port, broker_url(env["SLUICE_REDIS_URL"]))
                procs.append(
                    subprocess.Popen(
                        cmd, env=_service_env(service, env, port), stdout=log, stderr=log
                    )
                )
        # Auth is on, as compose runs it: an operator's first key, made in the database.
        db = Database(env["SLUICE_DATABASE_URL"])
        key, _ = create_key(db, owner="ops", name="deploy-test")
        db.dispose()
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{api_port}",
            timeout=30,
            headers={"Authorization": f"Bearer {key}"},
        )
        _wait_http(api, "/readyz")
        job = api.post("/v1/jobs", json={"prompt": "compose says hi", "max_tokens": 3})
        assert job.status_code == 202, job.text
        done = api.get(f"/v1/jobs/{job.json()['id']}", params={"wait": 30}).json()
        assert done["status"] == "succeeded" and done["output"] == "compose says hi"
        # Each service's own compose health check, run natively, passes.
        ports = {"8000": str(api_port), "5555": str(flower_port)}
        for service in ("api", "worker", "webhooks", "flower"):
            _wait_healthy(service, ports, _service_env(service, env, None))
        flower = httpx.Client(base_url=f"http://127.0.0.1:{flower_port}", timeout=10)
        # Never open: refused without the login, served with it.
        assert flower.get("/api/workers").status_code == 401
        assert flower.get("/api/workers", auth=("ops", "s3cret")).status_code == 200
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _service_env(service: str, env: dict[str, Any], port: int | None) -> dict[str, str]:
    """The service's own environment from compose, with this host's addresses."""
    own = {k: str(v) for k, v in (COMPOSE["services"][service].get("environment") or {}).items()}
    out = {**env, **{k: v for k, v in own.items() if k not in env or k.startswith("SLUICE_F")}}
    if service == "flower":
        assert own["SLUICE_FLOWER_BASIC_AUTH"] == "${SLUICE_FLOWER_BASIC_AUTH:-}"
        out.update(
            SLUICE_FLOWER_HOST="127.0.0.1",
            SLUICE_FLOWER_PORT=str(port),
            SLUICE_FLOWER_BASIC_AUTH="ops:s3cret",
        )
    return {k: _interpolate(v) for k, v in out.items()}


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} and ${VAR-default} with nothing set: the default."""
    return re.sub(r"\$\{[A-Z_]+:?-([^}]*)\}", r"\1", value)


def _health_command(service: str, ports: dict[str, str]) -> list[str]:
    """The service's compose health check as a native command (host ports for its own)."""
    test = COMPOSE["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD", test
    exe = {"python": [sys.executable], "sluice": [sys.executable, "-m", "sluice.cli"]}[test[1]]
    args = []
    for arg in test[2:]:
        for compose_port, port in ports.items():
            arg = arg.replace(f":{compose_port}/", f":{port}/")
        args.append(arg)
    return exe + args


def _wait_healthy(service: str, ports: dict[str, str], env: dict[str, str]) -> None:
    cmd = _health_command(service, ports)
    deadline = time.monotonic() + 60
    while True:
        check = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
        if check.returncode == 0:
            return
        assert time.monotonic() < deadline, f"{service} never healthy: {check.stderr[-500:]}"
        time.sleep(0.5)


def test_compose_file_follows_the_compose_spec() -> None:
    # The compose_spec parser (Rust, strict: unknown keys, bad durations and enum values
    # fail) and its models generated from the Compose Specification's JSON schema. YAML
    # merge keys (<<) are resolved first, as Compose resolves them.
    spec = PyCompose.from_json(json.dumps(COMPOSE)).to_spec()
    services = spec.services or {}
    # Every long-running service says when it is healthy; migrate runs once and exits.
    for name, service in COMPOSE["services"].items():
        if name != "migrate":
            assert "healthcheck" in service, name
            assert services[name].healthcheck is not None
    worker = COMPOSE["services"]["worker"]["environment"]
    assert "Meta-Llama-3.1-8B-Instruct-AWQ-INT4" in worker["SLUICE_MODEL"]
    # Quantization on the worker only: nothing shared pins it, so a model change is one line.
    assert "SLUICE_QUANTIZATION" in worker
    assert "SLUICE_QUANTIZATION" not in COMPOSE["x-sluice-env"]
    # Flower: loopback on the host, a login always.
    flower = COMPOSE["services"]["flower"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert flower["command"] == ["sluice", "flower"]
    for bad in ({"healthchek": {}}, {"restart": 7}):
        broken = json.loads(json.dumps(COMPOSE))
        broken["services"]["api"].update(bad)
        with pytest.raises(ValueError):
            PyCompose.from_json(json.dumps(broken)).to_spec()


def test_compose_file_validates_against_the_compose_spec_json_schema() -> None:
    # The Compose Specification's own JSON schema, as check-jsonschema vendors it (its
    # check-compose-spec hook): the file Docker Compose itself validates against.
    schema = json.loads(
        files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [e.message for e in validator.iter_errors(COMPOSE)] == []
    wrong: list[dict[str, Any]] = [{"restart_policy": "always"}, {"ports": 8000}, {"env_file": 3}]
    for bad in wrong:
        broken = json.loads(json.dumps(COMPOSE))
        broken["services"]["api"].update(bad)
        assert list(validator.iter_errors(broken)), bad


def _wait_http(client: httpx.Client, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get(path).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{client.base_url}{path} never answered 200"
        time.sleep(0.1)
