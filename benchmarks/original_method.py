"""The Airflow DAG this project replaces, reproduced as faithfully as a script can.

Per 1,000-row batch: pandas `read_sql` of the next ids, a JSON round trip (XCom), then one
`INSERT ... ON CONFLICT (id) DO NOTHING` per row and a commit. Its filter dropped NULL bodies
and owners and empty strings, but let whitespace-only bodies through.

Usage: python benchmarks/original_method.py SOURCE_URL TARGET_URL ROWS
"""

import io
import sys

import pandas as pd
import sqlalchemy as sa

BATCH = 1000


def run(source_url: str, target_url: str, rows: int) -> int:
    source = sa.create_engine(source_url.replace("postgresql://", "postgresql+psycopg://", 1))
    target = sa.create_engine(target_url.replace("postgresql://", "postgresql+psycopg://", 1))
    last_loaded_id, processed, inserted = 0, 0, 0
    insert = sa.text(
        "INSERT INTO posts (id, title, body, owner_user_id, creation_date) "
        "VALUES (:id, :title, :body, :owner_user_id, :creation_date) "
        "ON CONFLICT (id) DO NOTHING"
    )
    while processed < rows:
        frame = pd.read_sql(
            sa.text(
                "SELECT id, title, body, owner_user_id, creation_date FROM posts "
                "WHERE id > :last ORDER BY id LIMIT :batch"
            ),
            source,
            params={"last": last_loaded_id, "batch": BATCH},
        )
        if frame.empty:
            break
        xcom = frame.to_json(orient="records", date_format="iso", date_unit="us")
        batch = pd.read_json(io.StringIO(xcom), orient="records", convert_dates=["creation_date"])
        batch = batch.dropna(subset=["body", "owner_user_id"])
        batch = batch[batch["body"] != ""]
        with target.begin() as connection:
            for record in batch.to_dict(orient="records"):
                record["owner_user_id"] = int(record["owner_user_id"])
                record["title"] = None if pd.isna(record["title"]) else record["title"]
                record["creation_date"] = record["creation_date"].to_pydatetime()
                inserted += connection.execute(insert, record).rowcount
        last_loaded_id = int(frame["id"].max())
        processed += len(frame)
    return inserted


if __name__ == "__main__":
    print(run(sys.argv[1], sys.argv[2], int(sys.argv[3])))
