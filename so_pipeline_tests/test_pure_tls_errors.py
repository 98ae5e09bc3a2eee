"""TLS errors, without a database: which libpq messages are certificate or TLS-setting problems
(never retried), what the message tells the user to do, and which TLS-looking errors are only
broken connections (retried). The messages are libpq's own words, as psycopg raises them.
"""

import traceback

import psycopg
import pytest

from so_pipeline.resources import DatabaseTLSError, PostgresResource, is_permanent, tls_advice

PASSWORD = "pw-MARKER-3a9d17"
AT = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
MISSING_ROOT = (
    'root certificate file "/etc/ssl/rds/global-bundle.pem" does not exist\n'
    "Either provide the file, use the system's trusted roots with sslrootcert=system, or "
    "change sslmode to disable server certificate verification."
)

TLS_PROBLEMS = [
    (
        AT + 'server certificate for "localhost" (and 1 other name) does not match host name '
        '"127.0.0.1"',
        "Connect with a host name the certificate names",
    ),
    (AT + "SSL error: certificate verify failed", "global-bundle.pem"),
    (AT + MISSING_ROOT, "Point sslrootcert in the URL at the CA bundle"),
    (AT + 'could not read root certificate file "/x": Permission denied', "can read"),
    ('connection is bad: invalid sslmode value: "verify_full"', "verify-full checks"),
    ('connection is bad: invalid "ssl_min_protocol_version" value: "TLSv9"', "TLSv1.2"),
    (AT + "SSL error: tlsv1 alert protocol version", "share no TLS version"),
    (AT + "server does not support SSL, but SSL was required", "Turn on ssl"),
    (AT + "could not get server's host name from server certificate", "sslrootcert"),
]


@pytest.mark.parametrize(("message", "advice"), TLS_PROBLEMS)
def test_certificate_and_tls_setting_errors_are_permanent_with_advice(
    message: str, advice: str
) -> None:
    error = psycopg.OperationalError(message)

    assert is_permanent(error)
    found = tls_advice(error)
    assert found is not None and advice in found


@pytest.mark.parametrize(
    "message",
    [
        # A connection that broke mid-TLS: the next attempt may well work.
        "consuming input failed: SSL SYSCALL error: EOF detected",
        "SSL connection has been closed unexpectedly",
        "server closed the connection unexpectedly",
        AT + "Connection refused",
        AT + "FATAL:  the database system is starting up",
    ],
)
def test_broken_tls_connections_stay_transient(message: str) -> None:
    error = psycopg.OperationalError(message)

    assert tls_advice(error) is None
    assert not is_permanent(error)


def test_a_server_error_with_a_sqlstate_is_not_read_as_a_tls_problem() -> None:
    """SQLSTATE decides when there is one: a serialization failure mentioning a certificate
    (a table of that name, say) stays transient."""
    error = psycopg.errors.SerializationFailure('conflict on "certificate"')

    assert tls_advice(error) is None
    assert not is_permanent(error)


def test_connect_fails_at_once_naming_the_setting_on_one_line_without_the_password() -> None:
    """libpq rejects a misspelt sslmode before it opens a socket: no server needed."""
    url = f"postgresql://so:{PASSWORD}@127.0.0.1:5432/so?sslmode=verify_full"
    resource = PostgresResource(resource_name="source_db", url=url)

    with pytest.raises(DatabaseTLSError) as failure, resource.connect():
        pass

    assert not failure.value.allow_retries
    assert failure.value.description == (
        "source_db: TLS to PostgreSQL at 127.0.0.1:5432/so failed (not retried): connection is "
        'bad: invalid sslmode value: "verify_full". Set sslmode to one of disable, allow, '
        "prefer, require, verify-ca, verify-full (verify-full checks the certificate and the "
        "host name)."
    )
    assert PASSWORD not in "".join(traceback.format_exception(failure.value))
