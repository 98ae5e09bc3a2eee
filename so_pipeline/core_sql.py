"""Runs SQLAlchemy Core statements on the resource's psycopg connections.

Queries are written with SQLAlchemy Core (composed, bound parameters, no strings glued
together); COPY needs psycopg's connection itself, so there is one kind of connection and
Core statements are compiled for it here.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.sql.ddl import ExecutableDDLElement

DIALECT = psycopg_dialect.dialect()


def execute(connection: psycopg.Connection, statement: sa.Executable) -> psycopg.Cursor[Any]:
    """Compile `statement` for PostgreSQL and run it with its bound parameters."""
    if isinstance(statement, ExecutableDDLElement):
        return connection.execute(str(statement.compile(dialect=DIALECT)))  # type: ignore[arg-type]
    compiled = statement.compile(  # type: ignore[attr-defined]
        dialect=DIALECT, compile_kwargs={"render_postcompile": True}
    )
    return connection.execute(str(compiled), compiled.params)


def scalar(connection: psycopg.Connection, statement: sa.Executable) -> Any:
    """The first column of the first row (None when there is no row)."""
    row = execute(connection, statement).fetchone()
    return None if row is None else row[0]


def server_encoding(connection: psycopg.Connection) -> str:
    """The database's encoding (UTF8, WIN1252, ...), as the server announced it."""
    return connection.info.parameter_status("server_encoding") or "UTF8"


# Planner settings that leave an index the only way to answer (see index_only_plans).
_INDEX_ONLY_SETTINGS = {
    "enable_seqscan": "off",
    "max_parallel_workers_per_gather": "0",
    "jit": "off",
}


@contextmanager
def index_only_plans(connection: psycopg.Connection) -> Iterator[None]:
    """Plan the statements run inside without a table scan, parallel workers or JIT, then put
    the settings back as they were (also inside a caller's transaction).

    For statements whose work is a window's worth of rows found through indexes (a count
    that a partial index answers, the merge of staged rows): without statistics on a table
    (never analyzed, or a fresh temporary one) PostgreSQL may guess and scan the whole of
    the big one, once per window or tick, a cost that grows with the table.
    """
    names = list(_INDEX_ONLY_SETTINGS)
    with connection.transaction():
        before = connection.execute(
            "SELECT " + ", ".join("current_setting(%s)" for _ in names), names
        ).fetchone()
        _set_locally(connection, _INDEX_ONLY_SETTINGS)
        try:
            yield
        finally:
            _set_locally(connection, dict(zip(names, before or (), strict=True)))


def _set_locally(connection: psycopg.Connection, settings: dict[str, str]) -> None:
    """set_config(..., is_local => true): for the current transaction only."""
    calls = ", ".join("set_config(%s, %s, true)" for _ in settings)
    connection.execute("SELECT " + calls, [v for item in settings.items() for v in item])
