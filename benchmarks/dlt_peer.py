"""dlt's copy of the source's posts, for the throughput benchmark (a peer in the same run).

    <python with dlt> benchmarks/dlt_peer.py SOURCE_URL TARGET_URL BACKEND

Run by the benchmark with the interpreter of an environment that has dlt (it is not one of
so_pipeline's dependencies):
    python -m venv /tmp/dlt_venv
    /tmp/dlt_venv/bin/pip install "dlt[postgres,sql_database]" pyarrow connectorx
Reads `posts` with dlt's `sql_table` (BACKEND: connectorx, pyarrow or sqlalchemy) and loads it
into the target's `dlt_posts.posts` through dlt's postgres destination in its CSV (COPY) file
format, replacing what is there. Prints the rows loaded.
"""

import sys
import tempfile

import dlt  # type: ignore[import-not-found]  # only in the peer's environment
import psycopg2  # type: ignore[import-untyped]
from dlt.sources.sql_database import sql_table  # type: ignore[import-not-found]

COLUMNS = ["id", "title", "body", "owner_user_id", "creation_date"]


def main() -> None:
    source_url, target_url, backend = sys.argv[1:4]
    # dlt's postgres destination insists on a password; the benchmark's server trusts local
    # connections and ignores it.
    target_url = target_url.replace("postgres@", "postgres:unused@", 1)
    posts = sql_table(
        credentials=source_url,
        table="posts",
        backend=backend,
        included_columns=COLUMNS,
        chunk_size=100_000,
    )
    pipeline = dlt.pipeline(
        pipeline_name="so_posts_peer",
        pipelines_dir=tempfile.mkdtemp(prefix="dlt_peer"),
        destination=dlt.destinations.postgres(credentials=target_url),
        dataset_name="dlt_posts",
    )
    pipeline.run(posts, write_disposition="replace", loader_file_format="csv")
    with psycopg2.connect(target_url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM dlt_posts.posts")
        print(f"rows loaded: {cursor.fetchone()[0]}")


if __name__ == "__main__":
    main()
