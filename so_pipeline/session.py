"""The settings every connection of so_pipeline opens with (importable without Dagster).

Only what a pooler passes on: PgBouncer (1.18, Debian 12's) refuses the `options` start-up
parameter outright, and a pooler in transaction mode would lose a session's `SET`. So no result
depends on a session setting: the SQL says what it means (a `timestamp with time zone` source
column is converted with `AT TIME ZONE 'UTC'`, timestamps are formatted with explicit
patterns), settings a transaction needs are `SET LOCAL` inside it, and psycopg prepares no
statement on the server (`prepare_threshold=None` in resources.py: a prepared statement lives
on one backend, which a pooler hands to other clients between transactions).
"""

SESSION_SETTINGS = {
    "application_name": "so_pipeline",
    "client_encoding": "UTF8",
}
