"""Webhook tests share the API suite's fixtures: a fresh database per module (SQLite, and
PostgreSQL when SLUICE_TEST_DATABASE_URL names one), real Redis, the API over HTTP."""

from tests.api.conftest import database_url, redis_url, start_api

__all__ = ["database_url", "redis_url", "start_api"]
