"""The PostgreSQL resource: one class, used for both `source_db` and `analytical_db`."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
import sqlalchemy as sa
from psycopg.conninfo import make_conninfo
from pydantic import Field

from so_pipeline.session import SESSION_SETTINGS

ACCEPTED_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


class DatabaseConfigError(dg.Failure):
    """A database URL that cannot be used: retrying will not help."""


class DatabaseTLSError(DatabaseConfigError):
    """The TLS settings or the server's certificate do not fit: retrying will not help."""


class DatabaseUnavailableError(dg.Failure):
    """The server could not be reached, or the connection broke: worth a retry."""


class DatabaseRefusedError(dg.Failure):
    """The server answered, but refused: bad credentials, missing database, no privilege."""


# SQLSTATE classes that retrying cannot fix: authorization (28), missing database (3D),
# syntax or access rules (42: missing table or column, insufficient privilege), a value the
# target cannot hold (22: out of range, an untranslatable character), a broken constraint (23),
# an unsupported feature (0A).
_PERMANENT_SQLSTATE_CLASSES = ("28", "3D", "42", "22", "23", "0A")
# ...except a unique violation: a row written behind the write lock; the retry merges it.
_RETRIED_SQLSTATES = ("23505",)
# libpq reports a refused login as text only (no SQLSTATE): these are PostgreSQL's own words
# for the same classes of error (servers with lc_messages other than English will be retried).
_PERMANENT_LOGIN_MESSAGES = (
    "password authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "permission denied",
)

_RDS_BUNDLE = (
    "for RDS, the global-bundle.pem from "
    "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem"
)
_POINT_AT_THE_CA = (
    "Point sslrootcert in the URL at the CA bundle that signed the server's certificate "
    f"({_RDS_BUNDLE})"
)
# libpq reports TLS problems as client-side text only (no SQLSTATE, no FATAL): each pattern
# (first match wins) with what to do. None of them is fixed by a retry. "SSL SYSCALL error"
# and "SSL connection has been closed unexpectedly" are broken connections and stay transient.
_TLS_PROBLEMS = (
    (
        "does not match host name",
        "Connect with a host name the certificate names (quoted first above; for RDS the "
        "instance's endpoint, not an IP address or another DNS alias), or check that this is "
        "the server you meant",
    ),
    ("root certificate file", f"{_POINT_AT_THE_CA}, in a file this process can read"),
    ("certificate verify failed", f"{_POINT_AT_THE_CA}; check it has not expired"),
    (
        "sslmode value",
        "Set sslmode to one of disable, allow, prefer, require, verify-ca, verify-full "
        "(verify-full checks the certificate and the host name)",
    ),
    (
        "protocol_version",
        "Set ssl_min_protocol_version / ssl_max_protocol_version to TLSv1.2 or TLSv1.3",
    ),
    (
        "protocol version",
        "The server and this client share no TLS version: "
        "check ssl_min_protocol_version / ssl_max_protocol_version in the URL",
    ),
    (
        "server does not support SSL",
        "Turn on ssl on the server, or check that the URL names the server you meant",
    ),
    ("certificate", "Check the URL's sslmode, sslrootcert, sslcert and sslkey settings"),
)


def tls_advice(error: BaseException) -> str | None:
    """What to do about `error` if it is a TLS or certificate problem, else None."""
    if getattr(error, "sqlstate", None):
        return None
    message = str(error)
    return next((advice for words, advice in _TLS_PROBLEMS if words in message), None)


def parse_url(raw_url: str, resource_name: str) -> sa.URL:
    """Parse a `postgresql://` or `postgresql+psycopg://` URL; fail naming the resource."""
    try:
        url = sa.make_url(raw_url.strip())
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise DatabaseConfigError(
            description=f"{resource_name}: the database URL is not a valid URL "
            "(expected postgresql://user:password@host:port/dbname)",
            allow_retries=False,
        ) from None
    if url.port is not None and not 0 < url.port < 65536:
        raise DatabaseConfigError(
            description=f"{resource_name}: port {url.port} is out of range (1 to 65535)",
            allow_retries=False,
        )
    if url.drivername not in ACCEPTED_SCHEMES:
        raise DatabaseConfigError(
            description=f"{resource_name}: unsupported URL scheme '{url.drivername}' "
            f"(use one of {', '.join(s + '://' for s in ACCEPTED_SCHEMES)})",
            allow_retries=False,
        )
    return url


def libpq_conninfo(url: sa.URL) -> str:
    """The URL as libpq reads it (its query string, e.g. sslmode, passes through)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def describe_location(url: sa.URL) -> str:
    """`host:port/dbname` for messages; never includes credentials."""
    host = url.host or url.query.get("host") or "local socket"
    if isinstance(host, tuple):
        host = ",".join(host)
    port = f":{url.port}" if url.port else ""
    return f"{host}{port}/{url.database or ''}"


def scrub(text: str, secret: str | None) -> str:
    """`text` on one line, with `secret` (a password) replaced by ***."""
    line = " ".join(text.split())
    return line.replace(secret, "***") if secret else line


def is_permanent(error: BaseException) -> bool:
    """Whether retrying cannot fix `error` (a refused login, a missing table, a privilege, a
    certificate that fails verification or TLS settings libpq rejects)."""
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate:
        return sqlstate.startswith(_PERMANENT_SQLSTATE_CLASSES) and sqlstate not in (
            _RETRIED_SQLSTATES
        )
    if tls_advice(error) is not None:
        return True
    message = str(error)
    return "FATAL" in message and any(words in message for words in _PERMANENT_LOGIN_MESSAGES)


def _named(application_name: str | None) -> dict[str, str]:
    return {"application_name": application_name} if application_name else {}


class PostgresResource(dg.ConfigurableResource):
    """A PostgreSQL database, reached with psycopg 3.

    SSL settings (`sslmode`, `sslrootcert`) go in the URL's query string.
    """

    resource_name: str = Field(description="How messages name this database, e.g. source_db.")
    url: str = Field(description="postgresql:// or postgresql+psycopg:// URL; use EnvVar.")
    connect_timeout_seconds: int = Field(default=10, description="Give up connecting after this.")

    @property
    def location(self) -> str:
        return describe_location(parse_url(self.url, self.resource_name))

    @contextmanager
    def connect(self, application_name: str | None = None) -> Iterator[psycopg.Connection]:
        """A connection in autocommit mode (open `connection.transaction()` to group writes).

        `application_name` (default: so_pipeline) is what pg_stat_activity shows. Closed on
        exit. Errors that name the database (unreachable, refused, broken) leave as one-line
        `dg.Failure`s naming this resource and its host, never the password.
        """
        url = parse_url(self.url, self.resource_name)
        try:
            connection = psycopg.connect(
                make_conninfo(
                    libpq_conninfo(url),
                    **{**SESSION_SETTINGS, **_named(application_name)},
                ),
                autocommit=True,
                connect_timeout=self.connect_timeout_seconds,
            )
        except psycopg.Error as error:
            raise self._failure(error, url) from None
        try:
            yield connection
        except psycopg.Error as error:
            if connection.broken or is_permanent(error):
                raise self._failure(error, url) from None
            raise  # e.g. a serialization failure: Dagster's retry policy runs the step again
        finally:
            connection.close()

    def _failure(self, error: BaseException, url: sa.URL) -> dg.Failure:
        """A one-line error naming this resource and its host, with any password scrubbed."""
        reason = scrub(str(error), url.password)
        location = describe_location(url)
        advice = tls_advice(error)
        if advice is not None:
            return DatabaseTLSError(
                description=f"{self.resource_name}: TLS to PostgreSQL at {location} failed "
                f"(not retried): {reason.rstrip('.')}. {advice}.",
                allow_retries=False,
            )
        if is_permanent(error):
            return DatabaseRefusedError(
                description=f"{self.resource_name}: PostgreSQL at {location} refused: {reason}",
                allow_retries=False,
            )
        return DatabaseUnavailableError(
            description=f"{self.resource_name}: cannot use PostgreSQL at {location}: {reason}"
        )
