"""Runs SQLAlchemy Core statements on the resource's psycopg connections.

Queries are written with SQLAlchemy Core (composed, bound parameters, no strings glued
together); COPY needs psycopg's connection itself, so there is one kind of connection and
Core statements are compiled for it here.
"""

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
