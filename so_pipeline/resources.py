"""The PostgreSQL resource: one class, used for both `source_db` and `analytical_db`."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
import sqlalchemy as sa
from pydantic import Field, PrivateAttr

ACCEPTED_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")

# Every session works in UTC (a timestamptz source column becomes a UTC timestamp) and
# speaks ISO dates and UTF-8, whatever the servers' own defaults are.
_SESSION_SETUP = "SET TIME ZONE 'UTC'; SET datestyle = 'ISO'; SET client_encoding = 'UTF8'"


class DatabaseConfigError(dg.Failure):
    """A database URL that cannot be used: retrying will not help."""


class DatabaseUnavailableError(dg.Failure):
    """The server could not be reached, or the connection broke: worth a retry."""


class DatabaseRefusedError(dg.Failure):
    """The server answered, but refused: bad credentials, missing database, no privilege."""


# SQLSTATE classes that retrying cannot fix: authorization (28), missing database (3D),
# syntax or access rules (42: missing table or column, insufficient privilege).
_PERMANENT_SQLSTATE_CLASSES = ("28", "3D", "42")
# libpq reports a refused login as text only (no SQLSTATE): these are PostgreSQL's own words
# for the same classes of error (servers with lc_messages other than English will be retried).
_PERMANENT_LOGIN_MESSAGES = (
    "password authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "permission denied",
)


def to_psycopg_url(raw_url: str, resource_name: str) -> sa.URL:
    """Parse a `postgresql://` or `postgresql+psycopg://` URL and pin the psycopg 3 driver."""
    try:
        url = sa.make_url(raw_url.strip())
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise DatabaseConfigError(
            description=f"{resource_name}: the database URL is not a valid URL "
            "(expected postgresql://user:password@host:port/dbname)",
            allow_retries=False,
        ) from None
    if url.drivername not in ACCEPTED_SCHEMES:
        raise DatabaseConfigError(
            description=f"{resource_name}: unsupported URL scheme '{url.drivername}' "
            f"(use one of {', '.join(s + '://' for s in ACCEPTED_SCHEMES)})",
            allow_retries=False,
        )
    return url.set(drivername="postgresql+psycopg")


def describe_location(url: sa.URL) -> str:
    """`host:port/dbname` for messages; never includes credentials."""
    host = url.host or url.query.get("host") or "local socket"
    if isinstance(host, tuple):
        host = ",".join(host)
    port = f":{url.port}" if url.port else ""
    return f"{host}{port}/{url.database or ''}"


class PostgresResource(dg.ConfigurableResource):
    """A PostgreSQL database, reached through a SQLAlchemy engine on psycopg 3.

    SSL settings (`sslmode`, `sslrootcert`) go in the URL's query string.
    """

    resource_name: str = Field(description="How messages name this database, e.g. source_db.")
    url: str = Field(description="postgresql:// or postgresql+psycopg:// URL; use EnvVar.")
    connect_timeout_seconds: int = Field(default=10, description="Give up connecting after this.")

    _engine: sa.Engine | None = PrivateAttr(default=None)

    @property
    def location(self) -> str:
        return describe_location(to_psycopg_url(self.url, self.resource_name))

    def get_engine(self) -> sa.Engine:
        if self._engine is None:
            engine = sa.create_engine(
                to_psycopg_url(self.url, self.resource_name),
                poolclass=sa.NullPool,
                connect_args={
                    "connect_timeout": self.connect_timeout_seconds,
                    "application_name": "so_pipeline",
                },
            )
            sa.event.listen(engine, "connect", _setup_session)
            self._engine = engine
        return self._engine

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A SQLAlchemy connection inside a transaction, committed on success."""
        try:
            with self.get_engine().begin() as connection:
                yield connection
        except sa.exc.DBAPIError as error:
            raise self._failure(error.orig or error) from None

    @contextmanager
    def connect(self) -> Iterator[psycopg.Connection]:
        """A raw psycopg connection (for COPY), closed on exit; not in a transaction yet."""
        try:
            dbapi_connection = self.get_engine().raw_connection()
        except sa.exc.DBAPIError as error:
            raise self._failure(error.orig or error) from None
        try:
            connection: psycopg.Connection = dbapi_connection.driver_connection  # type: ignore[assignment]
            connection.autocommit = True
            yield connection
        except psycopg.Error as error:
            if connection.broken or _is_permanent(error):
                raise self._failure(error) from None
            raise  # e.g. a serialization failure: Dagster's retry policy runs the step again
        finally:
            dbapi_connection.close()

    def _failure(self, error: BaseException) -> dg.Failure:
        """A one-line error naming this resource and its host, with any password scrubbed."""
        reason = " ".join(str(error).split())
        password = to_psycopg_url(self.url, self.resource_name).password
        if password:
            reason = reason.replace(password, "***")
        if _is_permanent(error):
            return DatabaseRefusedError(
                description=f"{self.resource_name}: PostgreSQL at {self.location} refused: "
                f"{reason}",
                allow_retries=False,
            )
        return DatabaseUnavailableError(
            description=f"{self.resource_name}: cannot use PostgreSQL at {self.location}: {reason}"
        )


def _is_permanent(error: BaseException) -> bool:
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate:
        return sqlstate.startswith(_PERMANENT_SQLSTATE_CLASSES)
    message = str(error)
    return "FATAL" in message and any(words in message for words in _PERMANENT_LOGIN_MESSAGES)


def _setup_session(dbapi_connection: psycopg.Connection, _record: object) -> None:
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    dbapi_connection.execute(_SESSION_SETUP)
    dbapi_connection.autocommit = autocommit
