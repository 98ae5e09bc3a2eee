"""Passwords that rotate under a running daemon, and IAM authentication tokens.

The password tests run against Debian's PostgreSQL 15 started with scram-sha-256 on loopback
(the embedded server trusts local logins, so any password would do there). A password file is
read at every connection: a role's password changed with ALTER ROLE, and the file rewritten,
is used by the next run of a `dagster-daemon` that keeps running. An IAM token cannot be
checked without AWS, so a listener that speaks PostgreSQL's protocol (TLS with a certificate
from the test's CA, then a request for a cleartext password) takes what libpq sends: a token
that botocore signed locally, new for every connection, never the previous one.
"""

import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from so_pipeline import resources
from so_pipeline.resources import DatabaseConfigError, DatabaseRefusedError, PostgresResource
from so_pipeline_tests.helpers import (
    BIN,
    REPO_ROOT,
    PipelineDatabases,
    Post,
    background,
    free_port,
    log_lines,
    stop_schedule,
    wait_for,
)
from so_pipeline_tests.pooler import LoopbackPostgres
from so_pipeline_tests.tls import PrivateCA, require_openssl

pytestmark = pytest.mark.integration

ROLE = "so_pipeline_login"
FIRST, SECOND = "first-PW-4d2c91", "second-PW-7f03aa"


@pytest.fixture(scope="module")
def scram_server() -> Iterator[LoopbackPostgres]:
    server = LoopbackPostgres(free_port(), auth="scram-sha-256")
    try:
        yield server
    finally:
        server.stop()


def _set_password(server: LoopbackPostgres, password: str) -> None:
    server.execute(
        "postgres",
        sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(password)),
    )


def _write_password(path: Path, password: str) -> None:
    """Replace the file whole (a rename), as a rotation job should: no reader sees half."""
    staging = path.with_suffix(".new")
    staging.write_text(password + "\n")
    staging.chmod(0o600)
    staging.replace(path)


def _connect(resource: PostgresResource) -> None:
    """Open a connection and close it."""
    with resource.connect():
        pass


def _login_url(server: LoopbackPostgres, database: str) -> str:
    return f"postgresql://{ROLE}@127.0.0.1:{server.port}/{database}"


@pytest.fixture
def login_databases(scram_server: LoopbackPostgres) -> Iterator[PipelineDatabases]:
    """A source and an analytical database owned by ROLE (password FIRST); URLs as superuser."""
    scram_server.execute(
        "postgres",
        sql.SQL("DROP ROLE IF EXISTS {}; CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(ROLE), sql.Identifier(ROLE), sql.Literal(FIRST)
        ),
    )
    names = ("so_source_login", "so_analytical_login")
    for name in names:
        scram_server.drop_database(name)
        scram_server.create_database(name)
        scram_server.execute(
            "postgres",
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(name), sql.Identifier(ROLE)
            ),
        )
    yield PipelineDatabases(*(scram_server.url(name) for name in names))
    for name in names:
        scram_server.drop_database(name)


def test_a_password_file_is_read_at_every_connection_and_named_never_quoted(
    scram_server: LoopbackPostgres, login_databases: PipelineDatabases, tmp_path: Path
) -> None:
    password_file = tmp_path / "source.password"
    _write_password(password_file, FIRST)
    url = _login_url(scram_server, "so_source_login")
    source = PostgresResource(resource_name="source_db", url=url, password_file=str(password_file))
    with source.connect() as connection:
        assert connection.execute("SELECT current_user").fetchone() == (ROLE,)

    _set_password(scram_server, SECOND)
    with pytest.raises(DatabaseRefusedError) as refused:  # the file still holds the old one
        _connect(source)
    assert "password authentication failed" in str(refused.value)
    assert FIRST not in str(refused.value) and SECOND not in str(refused.value)
    _write_password(password_file, SECOND)
    with source.connect() as connection:  # the same resource: no restart
        assert connection.execute("SELECT 1").fetchone() == (1,)

    missing = str(tmp_path / "absent.password")
    started = time.monotonic()
    with pytest.raises(DatabaseConfigError, match=f"cannot read the password file {missing}"):
        _connect(PostgresResource(resource_name="source_db", url=url, password_file=missing))
    assert time.monotonic() - started < 1  # at once: nothing to retry
    with pytest.raises(DatabaseConfigError, match="remove the password from the URL"):
        _connect(
            PostgresResource(
                resource_name="source_db",
                url=url.replace(ROLE, f"{ROLE}:x"),
                password_file=str(password_file),
            )
        )


def _job_launch(env: dict[str, str]) -> None:
    subprocess.run(
        [str(BIN / "dagster"), "job", "launch", "-m", "so_pipeline"]
        + ["-j", "stackoverflow_posts_job"],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )


def _finished_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    done = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE}
    return [run for run in instance.get_runs() if run.status in done]


def test_a_running_daemon_uses_a_rotated_password_from_the_next_run(
    scram_server: LoopbackPostgres,
    login_databases: PipelineDatabases,
    dagster_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from so_pipeline.tooling.dump_loader import create_posts_table  # lxml: the local extra

    with psycopg.connect(login_databases.source_url, autocommit=True) as connection:
        create_posts_table(connection)
        connection.execute(sql.SQL("ALTER TABLE posts OWNER TO {}").format(sql.Identifier(ROLE)))
    login_databases.add_source_posts([Post(id=i) for i in range(1, 6)])
    for side, database in (("SOURCE", "so_source_login"), ("ANALYTICAL", "so_analytical_login")):
        password_file = tmp_path / f"{database}.password"
        _write_password(password_file, FIRST)
        monkeypatch.setenv(f"SO_{side}_DATABASE_URL", _login_url(scram_server, database))
        monkeypatch.setenv(f"SO_{side}_DATABASE_PASSWORD_FILE", str(password_file))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    env = os.environ.copy()
    stop_schedule(env)
    output = tmp_path / "daemon.log"

    with (
        background([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], output, env),
        dg.DagsterInstance.get() as instance,
    ):
        _job_launch(env)
        wait_for(lambda: len(_finished_runs(instance)) == 1, "the first run")
        _set_password(scram_server, SECOND)
        for database in ("so_source_login", "so_analytical_login"):
            _write_password(tmp_path / f"{database}.password", SECOND)
        login_databases.add_source_posts([Post(id=i) for i in range(6, 9)])
        _job_launch(env)
        wait_for(lambda: len(_finished_runs(instance)) == 2, "the second run")
        runs = _finished_runs(instance)
        logs = [entry.message for run in runs for entry in instance.all_logs(run.run_id)]

    assert [run.status for run in runs] == [dg.DagsterRunStatus.SUCCESS] * 2
    assert login_databases.loaded_ids() == list(range(1, 9))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(_login_url(scram_server, "so_source_login") + f"?password={FIRST}")
    written = "\n".join([*log_lines(output), *logs])
    assert FIRST not in written and SECOND not in written


# --- IAM authentication tokens --------------------------------------------------------------


class PasswordCatcher:
    """Listens on localhost:`port` as a PostgreSQL server that takes TLS (with `certificate`)
    and asks for a cleartext password: keeps each password it is sent, then refuses the login
    as PostgreSQL does (FATAL 28P01)."""

    def __init__(self, ca: PrivateCA) -> None:
        issued = ca.issue("catcher", ["localhost"])
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(issued.cert, issued.key)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.passwords: list[tuple[float, str]] = []  # (when, password)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                self._answer(client)
            except (OSError, ssl.SSLError, struct.error):
                pass
            finally:
                client.close()

    def _answer(self, client: socket.socket) -> None:
        length, code = struct.unpack("!ii", _read(client, 8))
        assert (length, code) == (8, 80877103), "expected an SSLRequest"
        client.sendall(b"S")
        with self._tls.wrap_socket(client, server_side=True) as tls:
            (length,) = struct.unpack("!i", _read(tls, 4))
            _read(tls, length - 4)  # the start-up message: user, database, ...
            tls.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
            kind, length = struct.unpack("!ci", _read(tls, 5))
            assert kind == b"p"
            self.passwords.append((time.time(), _read(tls, length - 4).rstrip(b"\0").decode()))
            fields = [b"SFATAL", b"VFATAL", b"C28P01", b"Mpassword authentication failed"]
            body = b"".join(field + b"\0" for field in fields) + b"\0"
            tls.sendall(b"E" + struct.pack("!i", len(body) + 4) + body)

    def close(self) -> None:
        self._listener.close()


def _read(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


@pytest.fixture
def catcher(tmp_path: Path) -> Iterator[PasswordCatcher]:
    require_openssl()
    listening = PasswordCatcher(PrivateCA(tmp_path / "ca"))
    yield listening
    listening.close()


@pytest.fixture
def aws_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials in the environment only: botocore looks nowhere else (no instance
    metadata, no files), and signs with them locally."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE00000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for variable in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(variable, str(tmp_path / "none"))
    for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(variable, raising=False)
    resources._rds_client.cache_clear()


def _iam_resource(catcher: PasswordCatcher, tmp_path: Path, sslmode: str) -> PostgresResource:
    query = f"sslmode={sslmode}&sslrootcert={tmp_path / 'ca' / 'ca.pem'}&gssencmode=disable"
    return PostgresResource(
        resource_name="analytical_db",
        url=f"postgresql://so_loader@localhost:{catcher.port}/analytics?{query}",
        iam_auth=True,
        aws_region="eu-west-1",
    )


def test_iam_auth_sends_a_token_signed_for_each_connection_and_never_reuses_one(
    catcher: PasswordCatcher, aws_credentials: None, tmp_path: Path
) -> None:
    resource = _iam_resource(catcher, tmp_path, "verify-full")
    messages = []
    for attempt in range(2):
        if attempt:
            time.sleep(1.1)  # the token's X-Amz-Date counts seconds
        with pytest.raises(DatabaseRefusedError) as refused:
            _connect(resource)
        messages.append(str(refused.value))

    assert len(catcher.passwords) == 2
    tokens = [token for _, token in catcher.passwords]
    assert tokens[0] != tokens[1]
    for (received, token), message in zip(catcher.passwords, messages, strict=True):
        where, _, query = token.partition("/?")
        assert where == f"localhost:{catcher.port}"
        fields = {name: values[0] for name, values in parse_qs(query).items()}
        assert fields["Action"] == "connect" and fields["DBUser"] == "so_loader"
        assert "/eu-west-1/rds-db/aws4_request" in fields["X-Amz-Credential"]
        assert fields["X-Amz-Expires"] == "900" and len(fields["X-Amz-Signature"]) == 64
        signed = datetime.strptime(fields["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        assert abs(signed.timestamp() - received) < 3  # made for this connection
        assert token not in message and fields["X-Amz-Signature"] not in message
        assert "password authentication failed" in message


@pytest.mark.parametrize("sslmode", ["require", "prefer", "disable"])
def test_iam_auth_without_a_verified_certificate_is_refused_before_connecting(
    catcher: PasswordCatcher, aws_credentials: None, tmp_path: Path, sslmode: str
) -> None:
    resource = _iam_resource(catcher, tmp_path, sslmode)
    with pytest.raises(DatabaseConfigError, match="IAM authentication needs a verified TLS"):
        _connect(resource)
    assert catcher.passwords == []  # no token went anywhere
