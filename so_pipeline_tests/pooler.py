"""Test helpers for poolers and passwords: Debian's PostgreSQL 15 on a loopback TCP port with
the authentication a test asks for (the embedded server listens on a Unix socket and trusts
local logins), and Debian's PgBouncer in front of it.

Used by test_pooler.py, test_credentials.py and benchmarks/connections.py; each skips (or
exits) with one line naming the Debian package when a component is missing. The processes run
as the `postgres` system user when the tests run as root, which neither program accepts.
"""

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from so_pipeline.tooling.embedded import LocalServer
from so_pipeline_tests.tls import postgres_bin_dir

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
)


def require_pgbouncer() -> str:
    if PGBOUNCER is None:
        pytest.skip("PgBouncer is not installed (apt-get install pgbouncer)")
    return PGBOUNCER


def _service_user() -> str | None:
    """The system user the servers run as (None: this one, when it is not root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "nobody"
    return "postgres"


class _Owned:
    """A directory right under /tmp that the service user owns (it cannot reach pytest's 0700
    basetemp); `remove` deletes it."""

    def __init__(self, prefix: str) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=prefix))
        self.user = _service_user()
        self.own(self.directory)

    def own(self, path: Path) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class LoopbackPostgres(LocalServer):
    """Debian's PostgreSQL on 127.0.0.1:`port` (no Unix socket). `auth` is pg_hba.conf's method
    for loopback TCP: `trust`, or `scram-sha-256` (then every login needs its password).

    The superuser is `postgres` with a random password; `url` logs in as it.
    """

    def __init__(self, port: int, auth: str = "trust") -> None:
        self.bin_dir = postgres_bin_dir()
        self._home = _Owned("so_pipeline_pg_")
        self.port = port
        self.password = "pg-" + secrets.token_hex(12)
        self.data_dir = self._home.directory / "data"
        self.log = self._home.directory / "server.log"
        password_file = self._home.directory / "pwfile"
        password_file.write_text(self.password + "\n")
        self._home.own(password_file)
        self._run(
            "initdb", "-D", str(self.data_dir), "-U", "postgres", "--pwfile", str(password_file),
            f"--auth-host={auth}", "--auth-local=reject", "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        password_file.unlink()
        (self.data_dir / "pg_hba.conf").write_text(f"host all all 127.0.0.1/32 {auth}\n")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 100\n"
            )
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log), "-w", "start")

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def execute(self, database: str, statement: sql.Composable | str) -> None:
        """Run one statement as the superuser."""
        with psycopg.connect(self.url(database), autocommit=True) as connection:
            connection.execute(statement)  # type: ignore[arg-type]

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        self._home.remove()

    def _run(self, program: str, *args: str) -> None:
        completed = subprocess.run(
            [str(self.bin_dir / program), *args],
            user=self._home.user,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
        )
        if completed.returncode:
            log = self.log.read_text() if self.log.exists() else ""
            raise AssertionError(f"{program} failed: {completed.stderr}{completed.stdout}{log}")


class PgBouncer:
    """Debian's PgBouncer on 127.0.0.1:`port`, in front of `server`, in transaction pooling
    mode: every database of the server under its own name, with `pool_size` server
    connections per database and user; `extra_databases` adds entries (name: settings such
    as `dbname=x pool_size=1`). Clients log in without a password (auth_type trust, on
    loopback only); PgBouncer logs in to the server as the client's user, so the server must
    trust it too.
    """

    def __init__(
        self,
        server: LoopbackPostgres,
        port: int,
        pool_size: int = 4,
        extra_databases: dict[str, str] | None = None,
    ) -> None:
        self._home = _Owned("so_pipeline_pgbouncer_")
        self.port = port
        directory = self._home.directory
        self.log = directory / "pgbouncer.log"
        users = directory / "userlist.txt"
        users.write_text('"postgres" ""\n')
        backend = f"host=127.0.0.1 port={server.port}"
        entries = "".join(
            f"{name} = {backend} {entry}\n" for name, entry in (extra_databases or {}).items()
        )
        config = directory / "pgbouncer.ini"
        config.write_text(
            f"[databases]\n{entries}* = {backend}\n\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {users}\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 200\n"
            f"logfile = {self.log}\npidfile = {directory / 'pgbouncer.pid'}\n"
        )
        for path in (users, config):
            self._home.own(path)
        self.process = subprocess.Popen(
            [require_pgbouncer(), str(config)],
            user=self._home.user,
            cwd="/",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    break
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.log.read_text() if self.log.exists() else ""
                    self.stop()
                    raise AssertionError(f"PgBouncer did not start: {log}") from None
                time.sleep(0.2)

    def url(self, database: str) -> str:
        """A URL of `database` through the pooler (as the server's superuser, no password)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._home.remove()
