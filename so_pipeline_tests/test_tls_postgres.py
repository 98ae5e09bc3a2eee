"""TLS, verified: the job through Dagster against a PostgreSQL server that accepts only TLS
connections (`hostssl` alone in pg_hba.conf), its certificate signed by a private CA made with
openssl for this test. `sslmode=verify-full` with that CA works for both databases and for
Dagster's own storage; a certificate for another host name, a CA that did not sign it, or a
missing CA file fails the run at once (no retry), naming the problem and what to do, without
the password.

Needs Debian's PostgreSQL server (`apt-get install postgresql-15`; the embedded server is built
without OpenSSL) and openssl; skipped, naming the package, without them.
"""

import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from so_pipeline_tests.helpers import (
    REPO_ROOT,
    ScratchDatabases,
    dagster_job_execute,
    free_port,
    generate_source_posts,
    prepare_dagster_home,
    run_job,
    run_until_caught_up,
)
from so_pipeline_tests.tls import PrivateCA, TlsOnlyPostgres, postgres_bin_dir, require_openssl

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> PrivateCA:
    require_openssl()
    return PrivateCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def tls_server(ca: PrivateCA) -> Iterator[TlsOnlyPostgres]:
    postgres_bin_dir()
    server = TlsOnlyPostgres(ca, free_port())
    yield server
    server.stop()


@pytest.fixture
def tls_databases(
    tls_server: TlsOnlyPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Source, analytical and Dagster storage databases on the TLS-only server, named (with
    verify-full against the CA) in the pipeline's variables and DAGSTER_PG_URL."""
    scratch = ScratchDatabases(tls_server)
    names = {}
    for variable, prefix in (
        ("SO_SOURCE_DATABASE_URL", "so_source"),
        ("SO_ANALYTICAL_DATABASE_URL", "so_analytical"),
    ):
        monkeypatch.setenv(variable, scratch.create(prefix))
        names[variable] = scratch.created[-1]
    prepare_dagster_home(tmp_path / "home", REPO_ROOT / "dagster.yaml", scratch, monkeypatch)
    names["DAGSTER_PG_URL"] = scratch.created[-1]
    yield names
    scratch.drop_all()


def test_the_server_accepts_only_tls(tls_server: TlsOnlyPostgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry .* no encryption"):
        psycopg.connect(tls_server.url("postgres", tls="sslmode=disable")).close()
    with psycopg.connect(tls_server.url("postgres")) as connection:
        (ssl,) = connection.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert ssl == (True,)


def test_verify_full_runs_the_job_with_both_databases_and_dagsters_storage(
    tls_server: TlsOnlyPostgres, tls_databases: dict[str, str]
) -> None:
    source = tls_server.url(tls_databases["SO_SOURCE_DATABASE_URL"])
    kept = generate_source_posts(source, 250)

    with dg.DagsterInstance.get() as instance:
        runs = run_until_caught_up(instance, batch_size=100)
        recorded = len(instance.get_runs())

    assert [run.metadata()["last_processed_id"] for run in runs] == [100, 200, 250]
    analytical = tls_server.url(tls_databases["SO_ANALYTICAL_DATABASE_URL"])
    with psycopg.connect(analytical) as connection:
        loaded = [row[0] for row in connection.execute("SELECT id FROM posts ORDER BY id")]
    assert loaded == kept
    # Dagster's runs live in the storage database on the TLS-only server (the last run found
    # nothing new and is recorded too).
    with psycopg.connect(tls_server.url(tls_databases["DAGSTER_PG_URL"])) as connection:
        (stored,) = connection.execute("SELECT count(*) FROM runs").fetchone() or (0,)
    assert stored == recorded == 4


@pytest.mark.parametrize(
    ("variable", "resource", "tls", "problem", "advice"),
    [
        (
            "SO_SOURCE_DATABASE_URL",
            "source_db",
            "wrong host",
            ('server certificate for "localhost"', 'does not match host name "127.0.0.1"'),
            "Connect with a host name the certificate names",
        ),
        (
            "SO_ANALYTICAL_DATABASE_URL",
            "analytical_db",
            "other CA",
            ("SSL error: certificate verify failed",),
            "Point sslrootcert in the URL at the CA bundle that signed the server's certificate "
            "(for RDS, the global-bundle.pem from https://truststore.pki.rds.amazonaws.com/",
        ),
        (
            "SO_SOURCE_DATABASE_URL",
            "source_db",
            "missing CA file",
            ('root certificate file "/nonexistent/global-bundle.pem" does not exist',),
            "Point sslrootcert in the URL at the CA bundle",
        ),
    ],
    ids=["source-wrong-host", "analytical-other-CA", "source-missing-CA-file"],
)
def test_a_certificate_problem_fails_the_run_at_once_naming_it(
    tls_server: TlsOnlyPostgres,
    tls_databases: dict[str, str],
    ca: PrivateCA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    resource: str,
    tls: str,
    problem: tuple[str, ...],
    advice: str,
) -> None:
    generate_source_posts(tls_server.url(tls_databases["SO_SOURCE_DATABASE_URL"]), 10)
    database = tls_databases[variable]
    if tls == "wrong host":
        url = tls_server.url(database, host="127.0.0.1")
    elif tls == "other CA":
        other = PrivateCA(tmp_path / "other_ca", "another CA")
        url = tls_server.url(database, tls=f"sslmode=verify-full&sslrootcert={other.cert}")
    else:
        missing = "sslmode=verify-full&sslrootcert=/nonexistent/global-bundle.pem"
        url = tls_server.url(database, tls=missing)
    monkeypatch.setenv(variable, url)

    with dg.DagsterInstance.get() as instance:
        started = time.monotonic()
        outcome = run_job(instance)
        elapsed = time.monotonic() - started
        logged = "\n".join(
            repr(event) for run in instance.get_runs() for event in instance.all_logs(run.run_id)
        )

    assert not outcome.success
    events = [event.event_type_value for event in outcome.result.all_events]
    assert "STEP_UP_FOR_RETRY" not in events
    assert events.count("STEP_FAILURE") == 1
    message = outcome.failure_message()
    location = f"{'127.0.0.1' if tls == 'wrong host' else 'localhost'}:{tls_server.port}"
    assert f"{resource}: TLS to PostgreSQL at {location}/{database} failed (not retried)" in (
        message
    )
    assert all(words in message for words in problem), message
    assert advice in message
    assert elapsed < 20, f"the run took {elapsed:.1f} s to fail"
    assert tls_server.password not in message
    assert tls_server.password not in logged


def test_a_wrong_host_for_dagsters_storage_fails_the_command_naming_the_certificate(
    tls_server: TlsOnlyPostgres, tls_databases: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dagster's own storage (dagster-postgres, psycopg2) verifies the same way. Its connection
    retries are Dagster's: about 12 s of them, each logging libpq's words, then the command
    fails."""
    storage = tls_server.url(tls_databases["DAGSTER_PG_URL"], "postgresql+psycopg2")
    monkeypatch.setenv("DAGSTER_PG_URL", storage.replace("@localhost:", "@127.0.0.1:"))

    started = time.monotonic()
    completed = dagster_job_execute(timeout=120)
    elapsed = time.monotonic() - started

    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert 'server certificate for "localhost"' in output
    assert 'does not match host name "127.0.0.1"' in output
    assert elapsed < 60, f"the command took {elapsed:.1f} s to fail"
    assert tls_server.password not in output
