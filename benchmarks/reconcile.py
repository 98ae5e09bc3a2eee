"""The reconciliation's cost against one read of every value of both databases, in one run.

    python -m benchmarks.reconcile [--rows 1000000] [--rounds 3] [--postgres-bin DIR]

On the throughput benchmark's server and synthetic source (its --data-dir), with a copy loaded
by the job, each round times:
1. the baseline: every value of the source `posts` and of the analytical `posts` and
   `posts_rejected` read once (`sum(length(...))` of each column, which detoasts every body),
   both databases at once, as the reconciliation reads them;
2. the reconciliation itself (in this process: Dagster's start-up left out) with every
   bucket's contents compared (content_days 1) and nothing to repair; then with the daily
   share (content_days 7);
3. the same after 1,000 scattered analytical rows were changed (all repaired);
4. a 15-minute tick (no new post) with change capture on and off.
It prints medians and worst cases, ratios to the baseline, and a projection for 55,000,000
posts. Every round ends by checking the copy equals the source (md5 of every value).
"""

import argparse
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import psycopg

from benchmarks.throughput import (
    BIN,
    Bench,
    add_postgres_bin_argument,
    bench_on_server,
    ensure_source,
    expected_fingerprint,
    loaded_fingerprint,
    max_id,
)
from so_pipeline import reconciliation
from so_pipeline.reconciliation import ReconcileSettings
from so_pipeline.resources import PostgresResource
from so_pipeline.run_connections import RunConnections

STACK_OVERFLOW_POSTS = 55_000_000
SCATTERED_CHANGES = 1_000


def read_every_value(source: str, target: str) -> float:
    """Seconds to read every value of both databases' posts tables, both at once."""
    columns = "sum(length(title)), sum(length(body)), sum(owner_user_id), max(creation_date)"

    def read(url: str, tables: list[str]) -> None:
        with psycopg.connect(url) as connection:
            for table in tables:
                connection.execute(f"SELECT {columns} FROM {table}").fetchone()

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        done = [
            pool.submit(read, source, ["posts"]),
            pool.submit(read, target, ["posts", "posts_rejected"]),
        ]
        for future in done:
            future.result()
    return time.monotonic() - started


def run_job(env: dict[str, str], job: str, config: str | None = None) -> float:
    """Seconds `dagster job execute` of `job` takes (a failed run raises)."""
    command = [str(BIN / "dagster"), "job", "execute", "-m", "so_pipeline", "-j", job]
    if config:
        path = Path(env["DAGSTER_HOME"]) / f"{job}.yaml"
        path.write_text(config)
        command += ["-c", str(path)]
    started = time.monotonic()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return time.monotonic() - started


def reconcile(source: str, target: str, content_days: int) -> float:
    """Seconds the reconciliation itself takes (compare, narrow, repair), in this process: what
    the daily job spends beyond Dagster's start-up."""
    source_db = PostgresResource(resource_name="source_db", url=source)
    analytical_db = PostgresResource(resource_name="analytical_db", url=target)
    settings = ReconcileSettings(content_days=content_days, day=date.today().toordinal())
    with RunConnections(source_db, analytical_db, run_id="benchmark") as run:
        result = reconciliation.reconcile(run, max_id(source), settings)
    if result.problem():
        raise RuntimeError(result.problem())
    return result.seconds


def still_changed(target: str) -> int:
    """Analytical rows that still carry the benchmark's change (0 once repaired)."""
    with psycopg.connect(target) as connection:
        row = connection.execute(
            "SELECT count(*) FROM posts WHERE body LIKE '%(changed by the benchmark)'"
        ).fetchone()
    return row[0] if row else -1


def scatter_changes(target: str, count: int) -> None:
    with psycopg.connect(target) as connection:
        connection.execute(
            "UPDATE posts SET body = body || ' (changed by the benchmark)' WHERE id IN "
            "(SELECT id FROM posts ORDER BY hashint8(id) LIMIT %s)",
            [count],
        )


def tick(env: dict[str, str], change_capture: bool) -> float:
    config = None if change_capture else "ops: {filtered_posts: {config: {change_column: ''}}}"
    return run_job(env, "stackoverflow_posts_job", config)


def summary(label: str, values: list[float], baseline: float | None = None) -> str:
    median, worst = statistics.median(values), max(values)
    ratio = f" = {median / baseline:.2f}x the baseline" if baseline else ""
    listed = ", ".join(f"{v:.2f}" for v in values)
    return f"{label}: median {median:.2f} s, worst {worst:.2f} s ({listed}){ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/so_bench"))
    add_postgres_bin_argument(parser)
    args = parser.parse_args()
    with bench_on_server(args.data_dir, "logs_reconcile", None, args.postgres_bin) as bench:
        run(bench, args)


def with_change_column(source: str) -> None:
    """Give the synthetic posts a last_activity_date and the index the README asks the DBA for
    (once: the source keeps them), so a tick's change capture reads as on Stack Overflow."""
    with psycopg.connect(source, autocommit=True) as connection:
        connection.execute(
            "UPDATE posts SET last_activity_date = creation_date WHERE last_activity_date IS NULL"
        )
        connection.execute(
            "CREATE INDEX IF NOT EXISTS posts_last_activity_date_id "
            "ON posts (last_activity_date, id)"
        )
        connection.execute("VACUUM ANALYZE posts")


def run(bench: Bench, args: argparse.Namespace) -> None:
    ensure_source(bench, args.rows)
    with_change_column(bench.source)
    _, target = bench.pipeline(1_000_000, "catch-up")
    env = bench.pipeline_env(target, "bench_dagster_reconcile")
    baseline, full, daily, repair, ticks_on, ticks_off = [], [], [], [], [], []
    for round_number in range(1, args.rounds + 1):
        print(f"Round {round_number}/{args.rounds} ...", flush=True)
        baseline.append(read_every_value(bench.source, target))
        full.append(reconcile(bench.source, target, 1))
        daily.append(reconcile(bench.source, target, 7))
        scatter_changes(target, SCATTERED_CHANGES)
        repair.append(reconcile(bench.source, target, 1))
        left = still_changed(target)
        print(
            f"  read every value {baseline[-1]:.2f} s; reconcile, all contents {full[-1]:.2f} s, "
            f"daily share {daily[-1]:.2f} s, {SCATTERED_CHANGES} changes repaired "
            f"{repair[-1]:.2f} s ({left} left unrepaired)",
            flush=True,
        )
        for _ in range(args.ticks):
            ticks_on.append(tick(env, True))
            ticks_off.append(tick(env, False))
    base = statistics.median(baseline)
    print()
    print(summary("Baseline, every value of both databases read once", baseline))
    print(summary("Reconciliation, every content compared, nothing to repair", full, base))
    print(summary("Reconciliation, the daily share of contents (content_days 7)", daily, base))
    print(summary(f"Reconciliation repairing {SCATTERED_CHANGES} scattered changes", repair, base))
    extra = statistics.median(repair) - statistics.median(full)
    print(f"  the {SCATTERED_CHANGES} repairs add {extra:.2f} s (medians)")
    on, off = statistics.median(ticks_on), statistics.median(ticks_off)
    print(summary("Tick with change capture", ticks_on))
    print(summary("Tick without change capture", ticks_off))
    print(f"  change capture costs {on / off:.2f}x a tick without it (goal: <= 1.2x)")
    scale = STACK_OVERFLOW_POSTS / args.rows
    print(
        f"55M projection (worst round x {scale:.0f}): all contents "
        f"{max(full) * scale / 60:.0f} min, the daily share {max(daily) * scale / 60:.0f} min"
    )
    print(
        f"Copy equals the source after the last repair: "
        f"{loaded_fingerprint(target) == expected_fingerprint(bench.source)}"
    )


if __name__ == "__main__":
    main()
