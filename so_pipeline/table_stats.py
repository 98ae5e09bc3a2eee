"""Figures about the analytical `posts` table for the materialization history."""

import html

import dagster as dg
import sqlalchemy as sa

from so_pipeline.resources import PostgresResource
from so_pipeline.schema import posts_table

PREVIEW_ROWS = 5
PREVIEW_BODY_CHARS = 80


def count_posts(analytical_db: PostgresResource) -> int:
    with analytical_db.begin() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(posts_table)).scalar_one()


def loaded_posts_preview(
    analytical_db: PostgresResource, after_id: int | None, last_id: int
) -> dg.MetadataValue:
    """The first few posts of the window as a Markdown table, bodies cut short."""
    columns = posts_table.c
    query = (
        sa.select(
            columns.id,
            columns.title,
            sa.func.left(columns.body, PREVIEW_BODY_CHARS).label("body"),
            columns.owner_user_id,
            columns.creation_date,
        )
        .where(columns.id <= last_id)
        .order_by(columns.id)
        .limit(PREVIEW_ROWS)
    )
    if after_id is not None:
        query = query.where(columns.id > after_id)
    with analytical_db.begin() as connection:
        rows = connection.execute(query).all()
    lines = ["| id | title | body | owner_user_id | creation_date |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [_cell(value) for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def _cell(value: object) -> str:
    """Post text as literal Markdown table text: HTML bodies are shown, not rendered."""
    text = "" if value is None else " ".join(str(value).split())
    return html.escape(text).replace("|", "\\|")
