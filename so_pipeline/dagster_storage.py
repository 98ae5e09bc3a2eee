"""Dagster's PostgreSQL storage, keeping its connections open between calls.

dagster-postgres opens a new connection for every read and write of its storage, except in
the webserver (SQLAlchemy's NullPool): a daemon that catches up 1M posts in one run opened
455 of them in 11 s (every heartbeat, queue check, sensor read and run event), each a backend
process to start on the server (and, on RDS, a TLS handshake). That churn was the largest
cost of the copy that the two raw pipes do not pay (README, "CPU per row"). This storage is
dagster-postgres's own, with each of its three parts (runs, event log, schedules) holding its
connections in a small pool, checked before each use so that a connection the server ended
(a restart, a failover) is replaced instead of failing the call.
"""

from collections.abc import Mapping
from typing import Any

from dagster._core.storage.config import PostgresStorageConfig
from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.utils import (
    create_pg_engine,
    get_token_provider_from_config,
    pg_url_from_config,
)

# Connections each part keeps open per process (daemon, code server, each run), and how many
# more it opens while its threads need them at once (closed when given back).
POOL_SIZE = 1
MAX_OVERFLOW = 10
# Reconnect after this long, so a rotated password or an IAM token is picked up.
POOL_RECYCLE_SECONDS = 600


class PooledPostgresStorage(DagsterPostgresStorage):
    """DagsterPostgresStorage whose runs, event log and schedule storages pool connections.

    Configured in dagster.yaml as `storage: custom:` with this module and class, and the
    same `config` as `storage: postgres:`.
    """

    @classmethod
    def from_config_value(  # type: ignore[override]  # the parent's own signature
        cls, inst_data: ConfigurableClassData | None, config_value: PostgresStorageConfig
    ) -> "PooledPostgresStorage":
        storage = cls(
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=bool(config_value.get("should_autocreate_tables", True)),
            token_provider=get_token_provider_from_config(config_value),
        )
        for part in storage.parts():
            part._engine = create_pg_engine(  # noqa: SLF001 (the engine dagster-postgres uses)
                part.postgres_url,
                part._token_provider,  # noqa: SLF001
                **pooled_engine_options(),
            )
        return storage

    def parts(self) -> list[Any]:
        """The run, event log and schedule storages, each with its own engine."""
        return [self.run_storage, self.event_log_storage, self.schedule_storage]


def pooled_engine_options() -> Mapping[str, Any]:
    return {
        "isolation_level": "AUTOCOMMIT",
        "pool_size": POOL_SIZE,
        "max_overflow": MAX_OVERFLOW,
        "pool_recycle": POOL_RECYCLE_SECONDS,
        "pool_pre_ping": True,
    }
