"""Database URLs and errors, without a database: parsing, scrubbing, and which errors are final.

`parse_url` refuses unusable URLs naming the resource and never the password; `scrub` and
`describe_location` keep credentials out of messages; `is_permanent` decides what is retried.
"""

import traceback

import psycopg
import pytest
import sqlalchemy as sa

from so_pipeline.resources import (
    DatabaseConfigError,
    describe_location,
    is_permanent,
    parse_url,
    scrub,
)

PASSWORD = "pw-MARKER-7c2e91"


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (psycopg.errors.InvalidAuthorizationSpecification(), True),  # 28000
        (psycopg.errors.InvalidPassword(), True),  # 28P01
        (psycopg.errors.InvalidCatalogName(), True),  # 3D000: no such database
        (psycopg.errors.UndefinedTable(), True),  # 42P01
        (psycopg.errors.UndefinedColumn(), True),  # 42703
        (psycopg.errors.InsufficientPrivilege(), True),  # 42501
        (psycopg.errors.UntranslatableCharacter(), True),  # 22P05: the target's encoding
        (psycopg.errors.DatetimeFieldOverflow(), True),  # 22008: a value out of range
        (psycopg.errors.NumericValueOutOfRange(), True),  # 22003
        (psycopg.errors.CheckViolation(), True),  # 23514
        (psycopg.errors.FeatureNotSupported(), True),  # 0A000
        (psycopg.errors.UniqueViolation(), False),  # 23505: written behind the lock, merged
        (psycopg.errors.ConnectionFailure(), False),  # 08006
        (psycopg.errors.ConnectionException(), False),  # 08000
        (psycopg.errors.SerializationFailure(), False),  # 40001
        (psycopg.errors.DeadlockDetected(), False),  # 40P01
        (psycopg.errors.AdminShutdown(), False),  # 57P01: the backend was terminated
        (ValueError("does not exist"), False),  # not a database error at all
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_is_permanent_by_sqlstate_class(error: BaseException, permanent: bool) -> None:
    assert is_permanent(error) is permanent


@pytest.mark.parametrize(
    ("message", "permanent"),
    [
        ('connection failed: FATAL:  password authentication failed for user "so"', True),
        ('connection failed: FATAL:  database "so" does not exist', True),
        ('connection failed: FATAL:  role "no_such_role" does not exist', True),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "so", database "so"', True),
        ('FATAL:  permission denied for database "so"', True),
        ("connection failed: Connection refused", False),
        ("connection failed: FATAL:  the database system is starting up", False),
        ("FATAL:  terminating connection due to administrator command", False),
        ("server closed the connection unexpectedly", False),
        ('relation "posts" does not exist', False),  # refused words, but no FATAL login
    ],
)
def test_is_permanent_reads_libpqs_fatal_login_messages(message: str, permanent: bool) -> None:
    """libpq reports a refused login as text only, without a SQLSTATE."""
    error = psycopg.OperationalError(message)
    assert error.sqlstate is None

    assert is_permanent(error) is permanent


@pytest.mark.parametrize(
    ("text", "secret", "expected"),
    [
        (f"failed:\n  {PASSWORD} was  refused", PASSWORD, "failed: *** was refused"),
        (f"{PASSWORD}/{PASSWORD}", PASSWORD, "***/***"),
        ("two\nlines\t here", None, "two lines here"),
        ("no password in the URL", "", "no password in the URL"),
    ],
)
def test_scrub_puts_a_message_on_one_line_without_the_password(
    text: str, secret: str | None, expected: str
) -> None:
    assert scrub(text, secret) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"postgresql://so_user:{PASSWORD}@db.example:5433/so", "db.example:5433/so"),
        (f"postgresql://so_user:{PASSWORD}@db.example/so", "db.example/so"),
        (f"postgresql://so_user:{PASSWORD}@db.example", "db.example/"),
        ("postgresql://so_user@/so?host=/run/postgresql", "/run/postgresql/so"),
        ("postgresql://so_user@/so?host=a.example&host=b.example", "a.example,b.example/so"),
        ("postgresql:///so", "local socket/so"),
    ],
)
def test_describe_location_names_host_port_and_database_only(url: str, expected: str) -> None:
    location = describe_location(sa.make_url(url))

    assert location == expected
    assert PASSWORD not in location and "so_user" not in location


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://so:{PASSWORD}@db.example:5432/so",
        f"postgres://so:{PASSWORD}@db.example:5432/so",
        f"postgresql+psycopg://so:{PASSWORD}@db.example:5432/so?sslmode=verify-full",
        f"  postgresql://so:{PASSWORD}@db.example:5432/so\n",  # pasted with white space
    ],
)
def test_parse_url_accepts_postgresql_urls(url: str) -> None:
    parsed = parse_url(url, "source_db")

    assert (parsed.host, parsed.port, parsed.database) == ("db.example", 5432, "so")
    assert parsed.password == PASSWORD


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"mysql://so:{PASSWORD}@db.example/so", "unsupported URL scheme 'mysql'"),
        (
            f"postgresql+psycopg2://so:{PASSWORD}@db.example/so",
            "unsupported URL scheme 'postgresql+psycopg2'",
        ),
        (f"postgresql://so:{PASSWORD}@db.example:port/so", "the database URL is not a valid URL"),
        (f"postgresql://so:{PASSWORD}@db.example:54a2/so", "the database URL is not a valid URL"),
        (f"postgresql://so:{PASSWORD}@db.example:99999/so", "port 99999 is out of range"),
        ("not a url", "the database URL is not a valid URL"),
        ("", "the database URL is not a valid URL"),
    ],
)
def test_parse_url_refuses_naming_the_resource_and_never_the_password(
    url: str, expected: str
) -> None:
    with pytest.raises(DatabaseConfigError) as failure:
        parse_url(url, "analytical_db")

    error = failure.value
    assert error.description is not None
    assert error.description.startswith(f"analytical_db: {expected}")
    assert not error.allow_retries
    shown = "".join(traceback.format_exception(error))  # what a user's log would show
    assert PASSWORD not in shown
