"""The PostgreSQL resource: one class, used for both `source_db` and `analytical_db`."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import sqlalchemy as sa
from psycopg.conninfo import make_conninfo
from pydantic import Field

from so_pipeline import database_url
from so_pipeline.database_url import (
    InvalidDatabaseURL,
    describe_location,
    libpq_conninfo,
    scrub,
)
from so_pipeline.session import SESSION_SETTINGS


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
        return database_url.parse_url(raw_url, resource_name)
    except InvalidDatabaseURL as error:
        raise DatabaseConfigError(description=str(error), allow_retries=False) from None


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


# The sslmodes that verify the server's certificate: an IAM token is a password that works
# for 15 minutes, and may only be sent to a server that proved it is the instance it signs for.
_VERIFYING_SSLMODES = ("verify-full", "verify-ca")


def read_password_file(path: str, resource_name: str) -> str:
    """The password in `path` (its first line, without the line ending), read now.

    A file that is missing, unreadable or empty fails at once (a retry reads the same file),
    naming the file, never its contents.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "not UTF-8"
        raise DatabaseConfigError(
            description=f"{resource_name}: cannot read the password file {path} ({reason}). "
            "Check that it exists and that the service user can read it.",
            allow_retries=False,
        ) from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise DatabaseConfigError(
            description=f"{resource_name}: the password file {path} is empty (expected the "
            "password on its first line).",
            allow_retries=False,
        )
    return password


@cache
def _rds_client(region: str) -> Any:
    """boto3's RDS client for `region` (made once: it loads botocore's service model; the
    tokens it signs are made fresh for every connection)."""
    import boto3  # type: ignore[import-untyped]  # the aws extra, only when iam_auth is set

    return boto3.session.Session().client("rds", region_name=region)


def iam_auth_token(url: sa.URL, region: str | None, resource_name: str) -> str:
    """A new IAM authentication token for the URL's user, host and port (signed locally with
    the process's AWS credentials, e.g. the EC2 instance profile; valid 15 minutes)."""
    try:
        import boto3  # type: ignore[import-untyped]  # no stubs (boto3-stubs: not needed)
        from botocore.exceptions import BotoCoreError  # type: ignore[import-untyped]
    except ImportError:
        raise DatabaseConfigError(
            description=f"{resource_name}: IAM authentication needs boto3: install "
            "so_pipeline with its aws extra (pip install 'so_pipeline[aws]').",
            allow_retries=False,
        ) from None
    region = region or boto3.session.Session().region_name
    if not region:
        raise DatabaseConfigError(
            description=f"{resource_name}: IAM authentication needs the database's AWS region: "
            "set aws_region (or AWS_REGION).",
            allow_retries=False,
        )
    try:
        return _rds_client(region).generate_db_auth_token(
            DBHostname=url.host, Port=url.port or 5432, DBUsername=url.username, Region=region
        )
    except BotoCoreError as error:  # e.g. no credentials: the process has no AWS identity
        raise DatabaseConfigError(
            description=f"{resource_name}: cannot make an IAM authentication token: {error}. "
            "Give the process AWS credentials (on EC2, an instance profile allowed "
            "rds-db:connect for this user).",
            allow_retries=False,
        ) from None


class PostgresResource(dg.ConfigurableResource):
    """A PostgreSQL database, reached with psycopg 3.

    SSL settings (`sslmode`, `sslrootcert`) go in the URL's query string. The password comes
    from the URL, from libpq itself (`passfile` in the URL, `~/.pgpass`), from `password_file`
    (read at every connection, so a rotated password is used from the next one on) or, with
    `iam_auth`, from a new IAM authentication token for every connection.
    """

    resource_name: str = Field(description="How messages name this database, e.g. source_db.")
    url: str = Field(description="postgresql:// or postgresql+psycopg:// URL; use EnvVar.")
    connect_timeout_seconds: int = Field(default=10, description="Give up connecting after this.")
    password_file: str | None = Field(
        default=None,
        description="A file whose first line is the password, read at every connection (the "
        "URL then has none).",
    )
    iam_auth: bool = Field(
        default=False,
        description="Log in with an RDS IAM authentication token made for each connection (the "
        "aws extra; needs sslmode=verify-full or verify-ca in the URL, and no password).",
    )
    aws_region: str | None = Field(
        default=None, description="The database's AWS region for iam_auth (default: AWS_REGION)."
    )

    @classmethod
    def from_env(cls, resource_name: str, prefix: str, deferred: bool = True) -> "PostgresResource":
        """The resource configured by `<prefix>_URL` and, when set, `<prefix>_PASSWORD_FILE`,
        `<prefix>_IAM_AUTH` (true) and `<prefix>_AWS_REGION`, e.g. SO_SOURCE_DATABASE_URL.

        `deferred`: as Dagster EnvVars, which Dagster reads when it builds the resource (and the
        UI shows by name); otherwise the values now, for use outside Dagster.
        """

        def value(name: str) -> Any:
            variable = f"{prefix}_{name.upper()}"
            return dg.EnvVar(variable) if deferred else os.environ.get(variable, "")

        settings: dict[str, Any] = {
            name: value(name)
            for name in ("password_file", "aws_region")
            if os.environ.get(f"{prefix}_{name.upper()}")
        }
        iam = os.environ.get(f"{prefix}_IAM_AUTH", "").strip().lower()
        if iam:
            settings["iam_auth"] = iam in ("1", "true", "yes", "on")
        return cls(resource_name=resource_name, url=value("url"), **settings)

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
        password = self._password(url)
        secret = password or url.password
        try:
            connection = psycopg.connect(
                make_conninfo(
                    libpq_conninfo(url),
                    **{**SESSION_SETTINGS, **_named(application_name)},
                    **({} if password is None else {"password": password}),
                ),
                autocommit=True,
                connect_timeout=self.connect_timeout_seconds,
                # No server-side prepared statements: one lives on a single backend, which a
                # pooler in transaction mode hands to other clients (psycopg would prepare a
                # query run 5 times). The pipeline repeats few statements: nothing to measure.
                prepare_threshold=None,
            )
        except psycopg.Error as error:
            raise self._failure(error, url, secret) from None
        try:
            yield connection
        except psycopg.Error as error:
            if connection.broken or is_permanent(error):
                raise self._failure(error, url, secret) from None
            raise  # e.g. a serialization failure: Dagster's retry policy runs the step again
        finally:
            connection.close()

    def _password(self, url: sa.URL) -> str | None:
        """The password to log in with now (None: the URL's, or libpq's passfile)."""
        name = self.resource_name
        if self.iam_auth and self.password_file:
            raise DatabaseConfigError(
                description=f"{name}: set password_file or iam_auth, not both.",
                allow_retries=False,
            )
        if (self.iam_auth or self.password_file) and url.password:
            raise DatabaseConfigError(
                description=f"{name}: the URL has a password and "
                f"{'iam_auth' if self.iam_auth else 'password_file'} is set: remove the "
                "password from the URL.",
                allow_retries=False,
            )
        if self.password_file:
            return read_password_file(self.password_file, name)
        if not self.iam_auth:
            return None
        sslmode = url.query.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer"
        if sslmode not in _VERIFYING_SSLMODES:
            raise DatabaseConfigError(
                description=f"{name}: IAM authentication needs a verified TLS connection: add "
                "sslmode=verify-full&sslrootcert=/etc/ssl/rds/global-bundle.pem to the URL "
                f"(it has sslmode={sslmode}).",
                allow_retries=False,
            )
        if not url.host or not url.username:
            raise DatabaseConfigError(
                description=f"{name}: IAM authentication needs the user and the instance's "
                "endpoint (host) in the URL.",
                allow_retries=False,
            )
        return iam_auth_token(url, self.aws_region, name)

    def _failure(self, error: BaseException, url: sa.URL, secret: str | None) -> dg.Failure:
        """A one-line error naming this resource and its host, with the password scrubbed."""
        reason = scrub(str(error), secret)
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
