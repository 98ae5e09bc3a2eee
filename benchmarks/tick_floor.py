"""A steady tick against Dagster's own floor, measured the same way in the same run.

    python -m benchmarks.tick_floor [--ticks 5]

On the throughput benchmark's server and source (reused from --data-dir), catches a fresh
analytical database up in one run, then alternates: 1,000 new posts and one default tick of
`stackoverflow_posts_job`, and one run of a trivial two-asset job (benchmarks/trivial_job.py),
both through `dagster job execute` against the same instance (PostgreSQL storage). Prints both
medians and their ratio. The posts it adds are deleted at the end.
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import psycopg

from benchmarks.throughput import (
    BIN,
    Bench,
    add_postgres_bin_argument,
    add_posts,
    bench_on_server,
    ensure_source,
    max_id,
    measure,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ticks", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1_000_000, help="source posts")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "so_bench")
    add_postgres_bin_argument(parser)
    args = parser.parse_args()
    with bench_on_server(args.data_dir, "logs_tick", postgres_bin=args.postgres_bin) as bench:
        ensure_source(bench, args.rows)
        run(bench, args.ticks)


def run(bench: Bench, ticks: int) -> None:
    target = bench.fresh_database("bench_tick_target", create_posts=False)
    env = bench.pipeline_env(target, "bench_tick_dagster")
    bench.execute_job(env, 2_000_000)  # caught up
    generated_max_id = max_id(bench.source)
    trivial = [str(BIN / "dagster"), "job", "execute", "-m", "benchmarks.trivial_job"]
    trivial += ["-j", "trivial_job"]
    ours, floor = [], []
    try:
        for _ in range(ticks):
            add_posts(bench.source, 1000)
            ours.append(bench.execute_job(env, None)[0])
            floor.append(measure(trivial, env)[0])
    finally:
        with psycopg.connect(bench.source) as connection:
            connection.execute("DELETE FROM posts WHERE id > %s", [generated_max_id])
    tick, base = statistics.median(ours), statistics.median(floor)
    print(f"steady tick (1,000 new posts): median {tick:.2f} s ({_listed(ours)})")
    print(f"trivial two-asset job: median {base:.2f} s ({_listed(floor)})")
    print(f"tick / Dagster's floor: {tick / base:.2f}x")


def _listed(timings: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in timings)


if __name__ == "__main__":
    main()
