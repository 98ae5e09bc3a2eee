"""Dagster's PostgreSQL storage, keeping its connections open between calls.

dagster-postgres opens a new connection for every read and write of its storage, except in
the webserver (SQLAlchemy's NullPool): a daemon that catches up 1M posts in one run opened
455 of them in 11 s (every heartbeat, queue check, sensor read and run event), each a backend
process to start on the server (and, on RDS, a TLS handshake). That churn was the largest
cost of the copy that the two raw pipes do not pay (README, "A catch-up on a busy machine").
This storage is dagster-postgres's own, with each of its three parts (runs, event log,
schedules) holding its connections in a small pool, checked before each use so that a
connection the server ended (a restart, a failover) is replaced instead of failing the call,
and closed when Dagster disposes of the instance (the code server makes one per sensor
evaluation).
"""

from collections.abc import Mapping
from typing import Any

from dagster._core.storage.config import PostgresStorageConfig
from dagster._serdes import ConfigurableClassData
from dagster_postgres import (
    DagsterPostgresStorage,
    PostgresEventLogStorage,
    PostgresRunStorage,
    PostgresScheduleStorage,
)
from dagster_postgres.utils import (
    create_pg_engine,
    get_token_provider_from_config,
    pg_url_from_config,
)

# Connections each part keeps open per instance (the daemon's, each run's, each sensor
# evaluation's), and how many more it opens while its threads need them at once (closed when
# given back).
POOL_SIZE = 1
MAX_OVERFLOW = 10
# Reconnect after this long, so a rotated password or an IAM token is picked up.
POOL_RECYCLE_SECONDS = 600


def pooled_engine_options() -> Mapping[str, Any]:
    return {
        "isolation_level": "AUTOCOMMIT",
        "pool_size": POOL_SIZE,
        "max_overflow": MAX_OVERFLOW,
        "pool_recycle": POOL_RECYCLE_SECONDS,
        "pool_pre_ping": True,
    }


class _PooledEngine:
    """A dagster-postgres storage part whose engine (`_engine`, as dagster-postgres names it)
    pools its connections; disposing of the part closes them."""

    postgres_url: str
    _token_provider: Any
    _engine: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._engine = create_pg_engine(
            self.postgres_url, self._token_provider, **pooled_engine_options()
        )

    def dispose(self) -> None:
        super().dispose()  # type: ignore[misc]  # the storage part's own
        self._engine.dispose()


class PooledRunStorage(_PooledEngine, PostgresRunStorage):
    pass


class PooledEventLogStorage(_PooledEngine, PostgresEventLogStorage):
    pass


class PooledScheduleStorage(_PooledEngine, PostgresScheduleStorage):
    pass


class PooledPostgresStorage(DagsterPostgresStorage):
    """DagsterPostgresStorage whose runs, event log and schedule storages pool connections.

    Configured in dagster.yaml as `storage: custom:` with this module and class, and the
    same `config` as `storage: postgres:`.
    """

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: Any = None,
    ) -> None:
        # The parent creates Dagster's tables when they are missing, then the parts are
        # replaced by pooled ones (which need not look for the tables again).
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
        self._run_storage = PooledRunStorage(postgres_url, False, token_provider=token_provider)
        self._event_log_storage = PooledEventLogStorage(
            postgres_url, False, token_provider=token_provider
        )
        self._schedule_storage = PooledScheduleStorage(
            postgres_url, False, token_provider=token_provider
        )

    @classmethod
    def from_config_value(  # type: ignore[override]  # the parent's own signature
        cls, inst_data: ConfigurableClassData | None, config_value: PostgresStorageConfig
    ) -> "PooledPostgresStorage":
        return cls(
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=bool(config_value.get("should_autocreate_tables", True)),
            token_provider=get_token_provider_from_config(config_value),
        )
