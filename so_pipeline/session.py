"""The settings every connection of so_pipeline opens with (importable without Dagster).

Every session works in UTC (a timestamptz source column becomes a UTC timestamp) and speaks
ISO dates and UTF-8, whatever the servers' defaults are. These travel in the connection's
start-up packet rather than as a SET afterwards, so they hold on every backend a pooler
(PgBouncer in transaction mode) may hand a statement to.
"""

SESSION_SETTINGS = {
    "application_name": "so_pipeline",
    "client_encoding": "UTF8",
    "options": "-c TimeZone=UTC -c DateStyle=ISO",
}
