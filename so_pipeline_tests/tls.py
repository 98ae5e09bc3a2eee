"""Test helpers for TLS: a private CA made with openssl, and a PostgreSQL server that accepts
only TLS connections (Debian's binaries: the embedded server is built without OpenSSL).

Used by test_tls_postgres.py and test_ui_login.py; each skips with one line naming the Debian
package when a component is missing.
"""

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from so_pipeline.tooling.embedded import LocalServer

OPENSSL = shutil.which("openssl")


def require_openssl() -> str:
    if OPENSSL is None:
        pytest.skip("openssl is not installed (apt-get install openssl)")
    return OPENSSL


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_openssl(), *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


class PrivateCA:
    """A certificate authority in `directory` (EC P-256, valid two days): `cert` is the bundle
    a client trusts; `issue` signs server certificates for given host names."""

    def __init__(self, directory: Path, name: str = "so_pipeline test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.cert = directory / "ca.pem"
        self._key = directory / "ca.key"
        _openssl(
            *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-days", "2", "-subj", f"/CN={name}"),
            *("-keyout", str(self._key), "-out", str(self.cert)),
            *("-addext", "basicConstraints=critical,CA:TRUE"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
            cwd=directory,
        )

    def issue(self, name: str, hosts: Sequence[str]) -> Certificate:
        """A server certificate whose names (subjectAltName DNS entries) are `hosts`."""
        cert, key, request = (self.directory / f"{name}.{ext}" for ext in ("pem", "key", "csr"))
        extensions = self.directory / f"{name}.ext"
        extensions.write_text(
            "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            f"subjectAltName={','.join(f'DNS:{host}' for host in hosts)}\n"
        )
        _openssl(
            *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-subj", f"/CN={hosts[0]}", "-keyout", str(key), "-out", str(request)),
            cwd=self.directory,
        )
        _openssl(
            *("x509", "-req", "-in", str(request), "-CA", str(self.cert), "-CAkey", str(self._key)),
            *("-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert)),
            cwd=self.directory,
        )
        return Certificate(cert, key)


def postgres_bin_dir() -> Path:
    """Debian's PostgreSQL server binaries (the newest installed), or skip naming the package."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if not found:
        pytest.skip("Debian's PostgreSQL server is not installed (apt-get install postgresql-15)")
    return Path(found[-1]).parent


class TlsOnlyPostgres(LocalServer):
    """A PostgreSQL server on 127.0.0.1:`port` whose pg_hba.conf has only `hostssl` lines: it
    refuses every connection without TLS (and has no Unix socket). Its certificate, signed by
    `ca`, names `localhost` only, so `verify-full` to 127.0.0.1 fails the host name check.

    URLs come with `sslmode=verify-full&sslrootcert=<the CA>`. Run as the `postgres` system
    user (or `nobody`) when the tests run as root, which PostgreSQL refuses to run as.
    """

    def __init__(self, ca: PrivateCA, port: int) -> None:
        # Its own directory right under /tmp: the server's system user cannot reach pytest's
        # 0700 basetemp. `stop` deletes it.
        directory = Path(tempfile.mkdtemp(prefix="so_pipeline_tls_pg_"))
        self.directory = directory
        self.bin_dir = postgres_bin_dir()
        self.ca = ca
        self.port = port
        self.password = "pg-" + secrets.token_hex(12)
        self.data_dir = directory / "data"
        self._log = directory / "server.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres" if _user_exists("postgres") else "nobody"
        issued = ca.issue("postgres-server", ["localhost"])
        certificate = Certificate(directory / "server.pem", directory / "server.key")
        shutil.copyfile(issued.cert, certificate.cert)
        shutil.copyfile(issued.key, certificate.key)
        certificate.key.chmod(0o600)
        password_file = directory / "pwfile"
        password_file.write_text(self.password + "\n")
        for path in (directory, certificate.cert, certificate.key, password_file):
            self._own(path)
        self._run(
            "initdb", "-D", str(self.data_dir), "-U", "postgres", "--pwfile", str(password_file),
            "--auth-host=scram-sha-256", "--auth-local=reject", "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        password_file.unlink()
        (self.data_dir / "pg_hba.conf").write_text(
            "# TLS only: no `host`, `hostnossl` or `local` line, so anything else is refused.\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
                f"ssl = on\nssl_cert_file = '{certificate.cert}'\n"
                f"ssl_key_file = '{certificate.key}'\nfsync = off\n"
            )
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self._log), "-w", "start")

    def url(
        self,
        database: str,
        driver: str = "postgresql",
        host: str = "localhost",
        tls: str | None = None,
    ) -> str:
        """A URL of `database` with verify-full against the CA (or the query string `tls`)."""
        query = tls if tls is not None else f"sslmode=verify-full&sslrootcert={self.ca.cert}"
        return f"{driver}://postgres:{self.password}@{host}:{self.port}/{database}?{query}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)

    def _own(self, path: Path) -> None:
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, program: str, *args: str) -> None:
        completed = subprocess.run(
            [str(self.bin_dir / program), *args],
            user=self._user,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
        )
        if completed.returncode:
            log = self._log.read_text() if self._log.exists() else ""
            raise AssertionError(f"{program} failed: {completed.stderr}{completed.stdout}{log}")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
