"""What following a living source costs: ticks that apply edits, and the daily reconciliation.

    python -m benchmarks.living_source [--rows 1000000] [--ticks 3] [--edits 1000]

On the throughput benchmark's server and synthetic source (reused from --data-dir, or made),
in one run:
1. copies the source into a fresh analytical database with one `dagster job execute` of a
   1,000,000-post window (the copy time the reconciliation is compared with);
2. times steady ticks (`dagster job execute`, start to end) after --edits scattered edits at
   the source: with change capture off (the baseline), on without an index on
   (last_activity_date, id), and on with it; medians over --ticks, and the ratios;
3. times `stackoverflow_posts_reconciliation_job` with nothing to repair, then after 1,000
   scattered differences (half deleted at the source, half late rows below the cursor), and
   checks that the repair made the id sets equal.
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from benchmarks.throughput import (
    BIN,
    Bench,
    add_postgres_bin_argument,
    bench_on_server,
    ensure_source,
    measure,
    server_build,
)

LIVING_SOURCE = "bench_living_source"


def prepare_source(bench: Bench, rows: int) -> str:
    """A copy of the synthetic source whose last_activity_date is set (edits move it on)."""
    ensure_source(bench, rows)
    bench.server.drop_database(LIVING_SOURCE)
    with psycopg.connect(bench.server.url("postgres"), autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {LIVING_SOURCE} TEMPLATE bench_source")
    url = bench.server.url(LIVING_SOURCE)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("UPDATE posts SET last_activity_date = creation_date")
        connection.execute("VACUUM ANALYZE posts")
    return url


def run_job(bench: Bench, env: dict[str, str], job: str, config: str | None) -> float:
    command = [str(BIN / "dagster"), "job", "execute", "-m", "so_pipeline", "-j", job]
    if config:
        path = Path(env["DAGSTER_HOME"]) / "run_config.yaml"
        path.write_text(config)
        command += ["-c", str(path)]
    seconds, _, _ = measure(command, env)
    return seconds


def edit_posts(source: str, edits: int) -> None:
    """`edits` scattered posts get a new body and a last_activity_date of now."""
    with psycopg.connect(source) as connection:
        connection.execute(
            "UPDATE posts SET body = body || ' (edited)', last_activity_date = clock_timestamp() "
            "WHERE id IN (SELECT id FROM posts TABLESAMPLE SYSTEM (1) LIMIT %s)",
            [edits],
        )


def ticks(count: int, before: Callable[[], None], tick: Callable[[], float]) -> list[float]:
    timings = []
    for _ in range(count):
        before()
        timings.append(tick())
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--edits", type=int, default=1_000)
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "so_bench")
    add_postgres_bin_argument(parser)
    args = parser.parse_args()
    with bench_on_server(args.data_dir, "logs_living", postgres_bin=args.postgres_bin) as bench:
        run(bench, args)


def run(bench: Bench, args: argparse.Namespace) -> None:
    source = prepare_source(bench, args.rows)
    bench.source = source
    target = bench.fresh_database("bench_living_target", create_posts=False)
    env = bench.pipeline_env(target, "bench_living_dagster")
    copy_seconds = run_job(
        bench,
        env,
        "stackoverflow_posts_job",
        "ops: {source_posts_batch: {config: {batch_size: 2000000}}}",
    )
    print(f"Copy of {args.rows:,} posts (one run, change cursor started): {copy_seconds:.2f} s")

    off = "ops: {filtered_posts: {config: {change_column: ''}}}"
    results = {
        "tick, change capture off (baseline)": ticks(
            args.ticks,
            lambda: edit_posts(source, args.edits),
            lambda: run_job(bench, env, "stackoverflow_posts_job", off),
        )
    }
    # Catch the change cursor up with the edits made while it was off.
    run_job(bench, env, "stackoverflow_posts_job", None)
    results[f"tick applying {args.edits:,} edits, no index"] = ticks(
        args.ticks,
        lambda: edit_posts(source, args.edits),
        lambda: run_job(bench, env, "stackoverflow_posts_job", None),
    )
    with psycopg.connect(source, autocommit=True) as connection:
        connection.execute("CREATE INDEX ON posts (last_activity_date, id)")
    results[f"tick applying {args.edits:,} edits, with the index"] = ticks(
        args.ticks,
        lambda: edit_posts(source, args.edits),
        lambda: run_job(bench, env, "stackoverflow_posts_job", None),
    )
    baseline = statistics.median(next(iter(results.values())))
    summary = []
    for label, timings in results.items():
        median = statistics.median(timings)
        rounded = ", ".join(f"{t:.2f}" for t in timings)
        print(
            f"{label}: median {median:.2f} s, worst {max(timings):.2f} s ({rounded}) = "
            f"{median / baseline:.2f}x baseline"
        )
        summary.append(f"{label} {median:.2f} s ({max(timings):.2f} s)")

    reconcile = "stackoverflow_posts_reconciliation_job"
    clean = [run_job(bench, env, reconcile, None) for _ in range(args.ticks)]
    clean_median = statistics.median(clean)
    summary.append(f"reconciliation, nothing to repair {clean_median:.2f} s ({max(clean):.2f} s)")
    print(
        f"Reconciliation, nothing to repair: median {clean_median:.2f} s "
        f"(worst {max(clean):.2f} s) = "
        f"{clean_median / copy_seconds:.2f}x the copy; projected for 55M posts: "
        f"{clean_median:.2f} s x 55e6 / {args.rows:,} = "
        f"{clean_median * 55e6 / args.rows / 60:.1f} min"
    )
    with psycopg.connect(source) as connection:
        connection.execute(
            "DELETE FROM posts WHERE id IN (SELECT id FROM posts TABLESAMPLE SYSTEM (1) LIMIT 500)"
        )
        connection.execute(  # late rows: ids in the gaps below the cursor
            "INSERT INTO posts (id, title, body, owner_user_id, creation_date, last_activity_date) "
            "SELECT g * 97 + 1, 'late', '<p>late</p>', 1, now(), now() "
            "FROM generate_series(1, 3000) g "
            "WHERE NOT EXISTS (SELECT 1 FROM posts p WHERE p.id = g * 97 + 1) LIMIT 500"
        )
    repair = run_job(bench, env, reconcile, None)
    print(
        f"Reconciliation with 1,000 scattered differences: {repair:.2f} s "
        f"(+{repair - clean_median:.2f} s over nothing to repair)"
    )
    with psycopg.connect(source) as src, psycopg.connect(target) as tgt:
        theirs = src.execute("SELECT count(*), sum(hashint8(id)) FROM posts").fetchone()
        ours = tgt.execute(
            "SELECT sum(n), sum(h) FROM (SELECT count(*) n, sum(hashint8(id)) h FROM posts "
            "WHERE deleted_at IS NULL UNION ALL SELECT count(*), sum(hashint8(id)) "
            "FROM posts_rejected WHERE deleted_at IS NULL) t"
        ).fetchone()
    print(f"Id sets equal after the repair: {tuple(theirs) == tuple(ours)}")  # type: ignore[arg-type]
    print(
        f"SUMMARY living_source {time.strftime('%Y-%m-%d')} {server_build(bench)} "
        f"{args.rows:,} posts, quiet, median (worst) of {args.ticks}: " + "; ".join(summary)
    )


if __name__ == "__main__":
    main()
