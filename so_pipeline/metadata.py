"""Shapes values for Dagster's materialization metadata."""

import html
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import sqlalchemy as sa

from so_pipeline.table_contract import type_name


def numbers(values: dict[str, int | float | None]) -> dict[str, int | float]:
    """Metadata keeps numbers as numbers (so the UI can plot them) and leaves out unknowns."""
    return {key: value for key, value in values.items() if value is not None}


def labels(values: dict[str, object | None]) -> dict[str, dg.MetadataValue]:
    """Values shown as text, not plotted: ids of a window, settings (unknowns left out)."""
    return {key: dg.MetadataValue.text(str(v)) for key, v in values.items() if v is not None}


# filtered_posts' figures beyond the dashboard, each group one JSON entry: the UI plots every
# number at the top level (in alphabetical order), so only the dashboard's are left there.
GROUPS = ("backlog", "this_run", "changes", "totals")


def flattened(values: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata values with each group's figures lifted to the top level, as plain keys
    (`rows_loaded`, `ids_behind_source`, ...), for code that reads them."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in GROUPS and isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def column_schema(table: sa.Table) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(column.name, type_name(column), description=column.doc)
            for column in table.columns
        ]
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> dg.MetadataValue:
    """Rows as a Markdown table of literal text: HTML bodies are shown, not rendered."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def _cell(value: object) -> str:
    text = "" if value is None else " ".join(str(value).split())
    return html.escape(text).replace("|", "\\|")
