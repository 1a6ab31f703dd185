"""Settings: with each engine's own (worker/engines/), the only reader of SLUICE_ variables."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, AliasChoices, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluice.capabilities import Task, tasks
from sluice.errors import ConfigError
from sluice.webhooks.signing import parse_secrets
from sluice.webhooks.ssrf import Network, parse_allowlist


def _registered_engine(name: str) -> str:
    """SLUICE_ENGINE must name an engine in the registry (worker/engines/registry.py)."""
    # Imported by name: the sluice package never imports worker's code (the registry is data).
    names: list[str] = importlib.import_module("worker.engines.registry").engine_names()
    if name not in names:
        raise ValueError(f"unknown engine {name!r}; registered engines: {', '.join(names)}")
    return name


EngineName = Annotated[str, AfterValidator(_registered_engine)]
FeedMode = Literal["continuous", "batch"]


class Settings(BaseSettings):
    """Every Sluice knob, validated once at start."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="ignore", frozen=True)

    # Where the embedded defaults live (SQLite file, embedded Redis socket, tiny model).
    data_dir: Path = Path(".sluice")
    database_url: str | None = None
    redis_url: str | None = None

    # API
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    public_url: str | None = None
    # API keys (`sluice keys create`): on unless switched off explicitly, for local use only.
    auth: Literal["on", "off"] = "on"
    # The key the CLI and sluice.client send (default: the local key `sluice up` writes).
    api_key: str | None = Field(None, min_length=1)
    # Host headers the API answers (comma-separated; "*.example.com" matches subdomains,
    # "*" any): a rebound DNS name pointing at the API gets 400. Default: localhost names,
    # SLUICE_HOST when it is a name or address, and SLUICE_PUBLIC_URL's host.
    trusted_hosts: str = ""

    # What the worker serves and what the API accepts.
    engine: EngineName = "echo"
    # generate: chat, completions, responses; embed: /v1/embeddings only (a pooling model).
    task: Task = Task.GENERATE
    model: str = "sluice-echo"
    model_name: str | None = None
    served_models: str = ""  # comma-separated names the API accepts; default: model_name
    # Other names for them, `alias=model` comma-separated (e.g. gpt-4o-mini=llama-3.1-8b):
    # OpenAI code runs by changing base_url only (sluice/aliases.py).
    model_aliases: str = ""

    # Queueing and delivery
    chunk_size: int = Field(500, ge=1, le=10_000)
    lease_seconds: float = Field(600.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    reconcile_interval: float = Field(5.0, gt=0)
    idle_poll: float = Field(1.0, gt=0)
    visibility_timeout: int = Field(43_200, ge=60)
    # Bulk requests are queued in prefix order (lines sharing a prompt prefix together, for
    # the engine's prefix cache; sluice/prefix.py); false: in line order (arrival order).
    prefix_order: bool = True
    # Worker reliability: on SIGTERM what is in the engine gets this long to finish (the
    # rest goes back to the queue at once); an engine step longer than the stall limit is a
    # hang, and the worker exits non-zero so its supervisor restarts it.
    shutdown_grace: float = Field(30.0, ge=0)
    # `sluice up` and `sluice run` wait this long for their worker to load its model (a first
    # download of an 8B model can take many minutes), then stop with the reason.
    worker_start_timeout: float = Field(3600.0, gt=0)
    engine_stall_seconds: float = Field(300.0, gt=0)
    # Names this worker's leases; a supervisor that sets it can release them when it dies.
    worker_id: str | None = Field(None, min_length=1, max_length=128)
    # Testing only: faults to inject (see worker/faults.py), e.g. "engine-crash-on=POISON".
    faults: str = ""

    # Worker feeding
    feed_mode: FeedMode = "continuous"
    inflight_factor: float = Field(2.0, ge=1.0, le=16.0)
    worker_threads: int | None = Field(None, ge=1, le=4096)
    write_batch_max: int = Field(2000, ge=1)

    # Every engine: how many sequences it runs at once (its slots; vLLM's max_num_seqs), the
    # context length (prompt plus output tokens), the seed of requests without their own.
    # Each engine reads its other settings itself (EngineSettings in worker/engines/).
    max_num_seqs: int = Field(256, ge=1)
    max_model_len: int = Field(8192, ge=16)
    seed: int = 0

    # Limits
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1)
    max_file_lines: int = Field(50_000, ge=1)
    max_line_bytes: int = Field(1024 * 1024, ge=16)
    max_wait_seconds: float = Field(60.0, ge=0)
    # Online requests (/v1/chat/completions, /v1/completions): an answer not finished in this
    # long is 504 (an error event when streaming) and the request is cancelled.
    online_timeout: float = Field(600.0, gt=0)
    file_ttl_days: int = Field(30, ge=1)
    # Hostile input and overload (the API): every size bounded where it enters.
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    max_output_tokens: int | None = Field(None, ge=1)
    max_completion_window: int = Field(7 * 86400, ge=1)
    max_queued_requests: int = Field(1_000_000, ge=0)
    max_long_polls: int = Field(10_000, ge=1)
    retry_after_seconds: int = Field(5, ge=1, le=3600)
    db_ping_after_idle: float = Field(1.0, ge=0)

    # Metrics and readiness (sluice/metrics.py). The worker serves /metrics on this port when
    # it is set (0: any free port, logged; unset: off); the API always serves /metrics.
    worker_metrics_port: int | None = Field(None, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    # prometheus_client's own variable (it reads it at import): set, the API adds up its
    # uvicorn workers' metrics from the files there. An empty directory per API start.
    prometheus_multiproc_dir: Path | None = Field(
        None, validation_alias=AliasChoices("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
    )
    # /readyz is 503 while an accepted model has no live worker; false for deployments that
    # scale workers to zero and still want the API in rotation.
    ready_requires_worker: bool = True
    # A worker whose stats are older than this is not live (it publishes every second).
    worker_stale_seconds: float = Field(10.0, gt=0)

    # Webhooks (sluice/webhooks): signing secrets, comma-separated `whsec_<base64>` (each
    # signs every event, so receivers holding any one of them verify during a rotation);
    # networks trusted despite not being global (e.g. 10.0.0.0/8 for an internal receiver);
    # per-attempt timeout; retries with exponential backoff and jitter, for at most
    # webhook_retry_for seconds after the event.
    webhook_secret: str = ""
    webhook_allowlist: str = ""
    webhook_timeout: float = Field(10.0, gt=0, le=300)
    webhook_retry_for: float = Field(3 * 86400.0, ge=0)
    webhook_backoff_base: float = Field(5.0, gt=0)
    webhook_backoff_max: float = Field(3600.0, gt=0)
    webhook_poll: float = Field(1.0, gt=0)
    webhook_concurrency: int = Field(8, ge=1, le=256)

    # Flower (`sluice flower`, and `sluice up` starts it): bound to loopback unless set; basic
    # auth "user:password" (several comma-separated); unset, a generated one is stored in
    # DATA_DIR/flower-auth and printed. Flower never runs open.
    flower_host: str = "127.0.0.1"
    flower_port: int = Field(5555, ge=0, le=65535)
    flower_basic_auth: str | None = Field(
        None, pattern=r"^$|^[^:,\s]+:[^,\s]+(,[^:,\s]+:[^,\s]+)*$"
    )
    flower: bool = True  # false: `sluice up` starts no Flower

    # Logs: "text" (one line each) or "json" (one object per line, with batch and request
    # ids where known). Prompts and outputs are never logged unless log_prompts is set.
    log_format: Literal["text", "json"] = "text"
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_prompts: bool = False

    @model_validator(mode="after")
    def _check(self) -> Settings:
        multiproc = self.prometheus_multiproc_dir
        if multiproc is not None and not multiproc.is_dir():
            # prometheus_client would fail on the first counter, far from the cause.
            raise ValueError(f"PROMETHEUS_MULTIPROC_DIR={multiproc} is not a directory")
        if self.database_url is not None and not re.match(
            r"^(sqlite|postgresql)(\+\w+)?://", self.database_url
        ):
            raise ValueError("SLUICE_DATABASE_URL must start with sqlite:// or postgresql://")
        if self.redis_url is not None and not re.match(
            r"^(redis|rediss|redis\+socket|unix)://", self.redis_url
        ):
            raise ValueError("SLUICE_REDIS_URL must start with redis://, rediss:// or unix://")
        if self.task not in tasks(self.engine):
            served = ", ".join(sorted(tasks(self.engine)))
            raise ValueError(
                f"SLUICE_TASK={self.task}: the {self.engine} engine serves {served} only"
            )
        self._check_aliases()
        try:
            parse_secrets(self.webhook_secret)
        except ValueError as exc:
            raise ValueError(f"SLUICE_WEBHOOK_SECRET: {exc}") from None
        try:
            parse_allowlist(self.webhook_allowlist)
        except ValueError as exc:
            raise ValueError(f"SLUICE_WEBHOOK_ALLOWLIST: {exc}") from None
        return self

    def _check_aliases(self) -> None:
        from sluice.aliases import parse_aliases  # sluice.aliases reads Settings

        try:
            found = parse_aliases(self.model_aliases)
        except ValueError as exc:
            raise ValueError(f"SLUICE_MODEL_ALIASES: {exc}") from None
        for alias, target in found.items():
            if target not in self.accepted_models:
                raise ValueError(
                    f"SLUICE_MODEL_ALIASES: {alias}={target} names a model not served here "
                    f"(served: {', '.join(self.accepted_models)})"
                )
            if alias in self.accepted_models:
                raise ValueError(f"SLUICE_MODEL_ALIASES: {alias!r} is a served model's own name")

    @property
    def served_model(self) -> str:
        """The name clients use for the model this worker serves."""
        return self.model_name or self.model

    @property
    def accepted_models(self) -> list[str]:
        """Model names the API accepts (each has its own queue)."""
        names = [n.strip() for n in self.served_models.split(",") if n.strip()]
        return names or [self.served_model]

    @property
    def allowed_hosts(self) -> list[str]:
        """Host header values (without port) the API answers."""
        names = [n.strip().lower() for n in self.trusted_hosts.split(",") if n.strip()]
        if names:
            return names
        names = ["localhost", "127.0.0.1", "::1"]
        if self.host not in ("0.0.0.0", "::", ""):
            names.append(self.host.lower())
        if self.public_url:
            public = urlsplit(self.public_url).hostname
            if public:
                names.append(public.lower())
        return names

    @property
    def output_tokens_limit(self) -> int:
        """The largest max_tokens a request may ask for (default: the model's context)."""
        return self.max_output_tokens or self.max_model_len

    @property
    def resolved_database_url(self) -> str:
        """The configured database, or a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'sluice.db').resolve()}"

    @property
    def inflight_target(self) -> int:
        """How many requests a worker keeps claimed: about 2x the engine's slots."""
        return max(1, int(self.max_num_seqs * self.inflight_factor))

    @property
    def resolved_worker_threads(self) -> int:
        """Celery pool threads: each follows one message's ids until they are settled (the
        runner claims named ids and the database's queued rows alike, so a few suffice)."""
        return self.worker_threads or 4

    @property
    def webhook_keys(self) -> list[bytes]:
        """The webhook signing keys (empty: webhooks are off)."""
        return parse_secrets(self.webhook_secret)

    @property
    def webhook_networks(self) -> list[Network]:
        """Networks webhooks may reach although they are not global."""
        return parse_allowlist(self.webhook_allowlist)


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings, turning errors into one clear ConfigError."""
    # Settings ignores unknown SLUICE_ variables (an engine's own, a newer release's), but an
    # unknown keyword here is a caller's mistake, perhaps an engine setting (load_engine).
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(unknown)}")
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(invalid_settings(exc)) from None


def split_settings(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings' own keys, and the rest (an engine's own settings: load_engine takes them)."""
    shared = {k: v for k, v in values.items() if k in Settings.model_fields}
    return shared, {k: v for k, v in values.items() if k not in shared}


def invalid_settings(exc: ValidationError) -> str:
    """One line naming each SLUICE_ variable that failed validation, and why."""
    problems = []
    for err in exc.errors():
        loc = "_".join(str(p) for p in err["loc"]).upper()
        name = f"SLUICE_{loc}" if loc else "settings"
        problems.append(f"{name}: {err['msg']}")
    return "invalid settings: " + "; ".join(problems)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return load_settings()
