"""`so-pipeline`: try the pipeline locally on an embedded PostgreSQL, or load a dump."""

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from importlib import resources
from pathlib import Path

SAMPLE_DUMP = "cardano-posts.xml.gz"
DEFAULT_HOME = Path(".so_pipeline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so-pipeline", description=__doc__)
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("SO_PIPELINE_HOME", DEFAULT_HOME)),
        help="local state folder for the embedded PostgreSQL and Dagster (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="load sample posts and run the job until caught up")
    demo.add_argument("--batch-size", type=_positive, default=1000, help="posts per run (window)")
    dev = commands.add_parser("dev", help="set up like demo, then start `dg dev` on it")
    dev.add_argument("--port", type=int, default=3000)
    commands.add_parser(
        "status",
        help="one line (caught up, idle, catching up, stuck), cursor, backlog, posts and the "
        "last runs of the pipeline's jobs (of the databases in the environment, else of the "
        "local demo state)",
    )
    commands.add_parser(
        "metrics",
        help="the figures an operator graphs and alerts on, as OpenMetrics text (for a "
        "Prometheus textfile collector or any OpenMetrics scraper)",
    )
    commands.add_parser(
        "env",
        help="print the export lines that make dagster, dg and psql reach the local demo's "
        'databases (eval "$(so-pipeline env)"; the server must be running: so-pipeline dev '
        "or so-pipeline shell)",
    )
    commands.add_parser(
        "shell",
        help="a shell whose dagster, dg and psql reach the local demo's databases (its "
        "PostgreSQL runs until the shell exits)",
    )
    load = commands.add_parser(
        "load-dump", help="load a Posts.xml (.xml, .gz or .7z) into the source database"
    )
    load.add_argument("path", type=Path)
    load.add_argument(
        "--database-url",
        default=os.environ.get("SO_SOURCE_DATABASE_URL"),
        help="source database (default: $SO_SOURCE_DATABASE_URL). Leave the password out of it "
        "(every local user sees command lines): libpq reads PGPASSWORD or ~/.pgpass",
    )
    commands.add_parser(
        "alert-test",
        help="send a test message to every alert channel configured in the environment "
        "(SO_ALERT_WEBHOOK_URL, SO_ALERT_SMTP_URL)",
    )
    args = parser.parse_args(argv)
    if args.command == "alert-test":
        return _alert_test_command()
    if args.command == "load-dump":
        return _load_dump_command(args.path, args.database_url)
    # A SIGTERM unwinds like Ctrl-C, so the finally below stops the embedded server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    home: Path = args.home.resolve()
    reads = {"status": _print_status, "metrics": _print_metrics}
    if args.command in reads and "SO_SOURCE_DATABASE_URL" in os.environ:
        return reads[args.command]()
    try:
        local = _LocalSetup(home, quiet=args.command in {*reads, "env"})
    except ImportError as error:
        print(f"so-pipeline {args.command}: {error}", file=sys.stderr)
        return 2
    try:
        if args.command in reads:
            return reads[args.command]()
        if args.command == "env":
            return local.print_environment()
        if args.command == "shell":
            return local.run_shell()
        local.seed_source()
        if args.command == "demo":
            return local.run_until_caught_up(args.batch_size)
        return local.run_dagster_dev(args.port)
    finally:
        local.stop()


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop_process_group(process: subprocess.Popen[bytes], grace_seconds: float = 30) -> None:
    """Stop `process` and everything in its process group: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; give the rest of its group a moment, then check again.
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.2)
        if not _group_alive(process.pid):
            return


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


class _LocalSetup:
    """The embedded PostgreSQL with the source, analytical and Dagster databases, seeded."""

    def __init__(self, home: Path, quiet: bool = False) -> None:
        from so_pipeline.tooling.embedded import EmbeddedPostgres, local_environment

        # Said only when it starts one: a command that reads the state of a running `dev`
        # (status, env) merely connects to it.
        self.started = not server_running(home / "pgdata")
        if self.started:
            print(
                f"Starting the embedded PostgreSQL in {home / 'pgdata'} ...",
                file=sys.stderr if quiet else sys.stdout,
            )
        self.server = EmbeddedPostgres(home / "pgdata")
        dagster_home = home / "dagster_home"
        dagster_home.mkdir(parents=True, exist_ok=True)
        with resources.as_file(resources.files("so_pipeline") / "dagster.yaml") as config:
            shutil.copyfile(config, dagster_home / "dagster.yaml")
        os.environ.update(local_environment(self.server, dagster_home))

    def seed_source(self) -> None:
        from so_pipeline.resources import PostgresResource
        from so_pipeline.tooling.dump_loader import load_dump

        source = PostgresResource(
            resource_name="source_db", url=os.environ["SO_SOURCE_DATABASE_URL"]
        )
        sample = resources.files("so_pipeline.tooling") / "sample_data" / SAMPLE_DUMP
        with resources.as_file(sample) as path:
            result = load_dump(path, source)
        with source.connect() as connection:
            # Set up as the README asks of a real source: with the index change capture reads
            # (without it every run warns that it scans the whole table).
            connection.execute(
                "CREATE INDEX IF NOT EXISTS posts_last_activity_date_id "
                "ON posts (last_activity_date, id)"
            )
        if result.rows_loaded:
            print(
                f"Source: loaded {result.rows_loaded} real posts from {SAMPLE_DUMP} "
                "(cardano.stackexchange.com, CC BY-SA 4.0; see sample_data/ATTRIBUTION.md)"
            )

    def run_until_caught_up(self, batch_size: int) -> int:
        import dagster as dg

        from so_pipeline.post_rules import RejectReason
        from so_pipeline.tooling.runs import materialization_metadata, runs_until_caught_up

        run_config = {
            "ops": {"source_posts_batch": {"config": {"batch_size": batch_size}}},
            "loggers": {"console": {"config": {"log_level": "WARNING"}}},
        }
        totals: Counter[str] = Counter()
        cursor = None
        with dg.DagsterInstance.get() as instance:
            for run_number, result in enumerate(runs_until_caught_up(instance, run_config), 1):
                metadata = materialization_metadata(result, "filtered_posts")
                per_run = ("rows_loaded", "rows_rejected", *(f"rejected_{r}" for r in RejectReason))
                totals.update({key: metadata[key] for key in per_run})
                cursor = metadata["last_processed_id"]
                reread = metadata["rows_already_present"] + metadata["rows_already_rejected"]
                updated = metadata["rows_updated"]
                print(
                    f"run {run_number}: new ids ({metadata.get('window_after_id', 'start')}, "
                    f"{metadata['window_last_id']}]  read {metadata['rows_read']} = "
                    f"loaded {metadata['rows_loaded']} + rejected {metadata['rows_rejected']}"
                    f"{f' + updated {updated}' if updated else ''} + re-read unchanged {reread} "
                    f"(the look-back)  cursor -> {cursor}"
                )
            if cursor is None:
                from so_pipeline.cursor import cursor_from_history

                cursor = cursor_from_history(instance)
        rejected = ", ".join(
            f"{key.removeprefix('rejected_')} {count}"
            for key, count in sorted(totals.items())
            if key.startswith("rejected_") and count
        )
        print(
            f"Caught up (last run found nothing new). Loaded {totals['rows_loaded']} posts, "
            f"rejected {totals['rows_rejected']} ({rejected or 'none'}); cursor "
            f"last_processed_id = {cursor}.\nOpen the history with: so-pipeline dev"
        )
        return 0

    def run_dagster_dev(self, port: int) -> int:
        # Dagster's `dg dev` (`dagster dev` says it is superseded by it), given the code
        # location's module: that needs no pyproject.toml, so it works from a wheel install too.
        dg = Path(sys.executable).with_name("dg")
        command = [str(dg), "dev", "-m", "so_pipeline", "-h", "127.0.0.1", "-p", str(port)]
        print(f"Dagster UI on http://127.0.0.1:{port} (Ctrl-C to stop)")
        # Its own process group, so that stopping reaches the webserver, daemon and code
        # servers it starts; default signal handling, since a shell that starts us in the
        # background (`&`, as scripts and service managers do) leaves SIGINT ignored, and
        # `dg dev` stops on SIGINT.
        # Started in DAGSTER_HOME, beside the dagster.yaml it uses: from the repository, dg dev
        # would warn that the dagster.yaml there is not used.
        process = subprocess.Popen(
            command,
            process_group=0,
            preexec_fn=_default_signals,
            cwd=os.environ["DAGSTER_HOME"],
        )
        try:
            return process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop_process_group(process)

    def environment(self) -> dict[str, str]:
        """What dagster, dg and psql need to reach the demo's databases and history."""
        names = ("SO_SOURCE_DATABASE_URL", "SO_ANALYTICAL_DATABASE_URL", "DAGSTER_PG_URL")
        return {name: os.environ[name] for name in (*names, "DAGSTER_HOME")}

    @staticmethod
    def path_prefix() -> str:
        """psql (from the embedded server's wheel), then dagster, dg and so-pipeline."""
        from so_pipeline.tooling.embedded import postgres_bin

        return f"{postgres_bin()}{os.pathsep}{Path(sys.executable).parent}"

    def print_environment(self) -> int:
        for name, value in self.environment().items():
            print(f"export {name}={shlex.quote(value)}")
        print(f'export PATH={shlex.quote(self.path_prefix())}"{os.pathsep}$PATH"')
        print(
            "# then: dg check defs, dagster job execute -m so_pipeline -j stackoverflow_posts_job, "
            'psql "$SO_ANALYTICAL_DATABASE_URL"'
        )
        if self.started:
            print(
                "so-pipeline env: the demo's PostgreSQL was not running, and stops again as this "
                "command exits: keep `so-pipeline dev` (or `so-pipeline shell`) running while "
                "you use these settings",
                file=sys.stderr,
            )
        return 0

    def run_shell(self) -> int:
        shell = os.environ.get("SHELL") or "/bin/sh"
        print(
            'A shell on the demo\'s databases (dagster, dg, psql "$SO_ANALYTICAL_DATABASE_URL"); '
            "its PostgreSQL stops when you exit it.",
            file=sys.stderr,
        )
        path = f"{self.path_prefix()}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, **self.environment(), "PATH": path}
        return subprocess.run([shell], env=env).returncode

    def stop(self) -> None:
        self.server.stop()


def server_running(data_dir: Path) -> bool:
    """Whether a PostgreSQL server runs on `data_dir` (its postmaster.pid names a live process)."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _print_status() -> int:
    import dagster as dg

    from so_pipeline.resources import PostgresResource
    from so_pipeline.tooling.status import status_report

    source = PostgresResource.from_env("source_db", "SO_SOURCE_DATABASE", deferred=False)
    analytical = PostgresResource.from_env(
        "analytical_db", "SO_ANALYTICAL_DATABASE", deferred=False
    )
    with dg.DagsterInstance.get() as instance:
        print(status_report(instance, source, analytical))
    return 0


def _print_metrics() -> int:
    import dagster as dg

    from so_pipeline.tooling.status import openmetrics, read_figures

    with dg.DagsterInstance.get() as instance:
        sys.stdout.write(openmetrics(read_figures(instance)))
    return 0


def _load_dump_command(path: Path, database_url: str | None) -> int:
    # Not Dagster: its import alone would cost every load about half a second and 60 MB.
    try:
        from so_pipeline.tooling.dump_loader import (
            DatabaseURL,
            DumpError,
            DumpInterrupted,
            load_dump,
        )
    except ImportError as error:
        print(f"load-dump: {error}: pip install 'so_pipeline[local]'", file=sys.stderr)
        return 2

    if not database_url:
        print("load-dump: set SO_SOURCE_DATABASE_URL or pass --database-url", file=sys.stderr)
        return 2
    source = DatabaseURL(database_url)
    # One line on stderr for every way a load stops (the loader says where and what is
    # committed); a traceback would bury it.
    try:
        if database_url != os.environ.get("SO_SOURCE_DATABASE_URL") and source.parsed().password:
            print(
                "load-dump: warning: the password in --database-url is visible to every local "
                "user (ps); put the URL in SO_SOURCE_DATABASE_URL, or leave the password out "
                "and use PGPASSWORD or ~/.pgpass",
                file=sys.stderr,
            )
        result = load_dump(
            path, source, on_progress=lambda p: print(f"  {p.describe()}", flush=True)
        )
    except DumpInterrupted as error:
        print(f"load-dump: {error}", file=sys.stderr)
        return 130
    except DumpError as error:
        print(f"load-dump: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"load-dump: {path}: interrupted before loading began", file=sys.stderr)
        return 130
    print(f"Loaded {result.rows_loaded} posts; skipped {result.rows_skipped} already present.")
    return 0


def _alert_test_command() -> int:
    """Exit 0 when every channel took the message, 1 when one did not, 2 when none is set."""
    import logging

    from so_pipeline.alert_channels import channels_from_env, deliver

    settings = channels_from_env()
    for problem in settings.problems:
        print(f"alert-test: {problem}", file=sys.stderr)
    if not settings.channels:
        print(
            "alert-test: no alert channel configured: set SO_ALERT_WEBHOOK_URL, or "
            "SO_ALERT_SMTP_URL and SO_ALERT_EMAIL_TO",
            file=sys.stderr,
        )
        return 2
    subject = "[so_pipeline] TEST: alerts reach this channel"
    text = f"{subject}\nSent by `so-pipeline alert-test`; no action needed."
    # Retries are reported on stderr as they happen, the outcome per channel on stdout.
    log = logging.getLogger("so_pipeline.alert_test")
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.propagate = False
    deliveries = [deliver(channel, subject, text, log) for channel in settings.channels]
    for delivery in deliveries:
        print(delivery.describe())
    return 0 if all(delivery.ok for delivery in deliveries) else 1


if __name__ == "__main__":
    raise SystemExit(main())
