"""Alembic environment: Sluice's tables, its database URL, one upgrader at a time."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from sluice.migrate import is_sqlite, migration_engine, migration_lock, sqlalchemy_url
from sluice.models import Base

config = context.config

# Only the `alembic` command line has an ini file; code that embeds Alembic keeps its logging.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    # A URL set on the Config by code (sluice.migrate, tests) wins over the settings.
    explicit = config.get_main_option("sqlalchemy.url")
    if explicit:
        return explicit
    from sluice.config import get_settings

    return get_settings().resolved_database_url


def run_migrations_offline() -> None:
    """Emit the SQL for `alembic upgrade --sql` without a connection."""
    url = _database_url()
    context.configure(
        url=sqlalchemy_url(url),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=is_sqlite(url),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations on a connection, holding the database's migration lock."""
    url = _database_url()
    engine = migration_engine(url)
    try:
        with engine.connect() as connection, migration_lock(connection):
            sqlite = connection.dialect.name == "sqlite"
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER most things: rebuild tables in batch mode.
                render_as_batch=sqlite,
                # Our SQLite engine issues a real BEGIN IMMEDIATE, so SQLite's DDL is
                # transactional: an upgrade applies whole or not at all, under one write lock.
                transactional_ddl=True if sqlite else None,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
