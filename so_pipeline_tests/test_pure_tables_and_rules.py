"""Table contracts, metadata tables and the whitespace rule, without a database.

The contracts come from `post_fields()` (the analytical table definitions); the Python side of
the whitespace rule must be exactly `str.isspace()` (test_filtering.py checks PostgreSQL's).
"""

import re
import sys

import pytest

from so_pipeline.analytical_schema import post_fields
from so_pipeline.metadata import markdown_table
from so_pipeline.post_rules import NON_WHITESPACE_REGEX, WHITESPACE_RANGES
from so_pipeline.table_contract import contract_problems, exact_types, family_types

INTEGERS = frozenset({"smallint", "integer", "bigint"})
TEXTS = frozenset({"text", "character varying", "character"})
TIMESTAMPS = frozenset({"timestamp without time zone", "timestamp with time zone"})

# The analytical posts table as the pipeline creates it (information_schema's spelling).
ANALYTICAL_COLUMNS = {
    "id": "bigint",
    "title": "text",
    "body": "text",
    "owner_user_id": "bigint",
    "creation_date": "timestamp without time zone",
}
# A source table of other types of the same families, with a column the pipeline does not read.
OTHER_SOURCE_COLUMNS = {
    "id": "integer",
    "title": "character varying",
    "body": "character varying",
    "owner_user_id": "integer",
    "creation_date": "timestamp with time zone",
    "score": "integer",
}


def test_exact_types_are_each_fields_own_type_text_also_as_varchar() -> None:
    contract = exact_types(post_fields())

    assert list(contract) == [column.name for column in post_fields()]
    assert contract == {
        "id": {"bigint"},
        "title": {"text", "character varying"},
        "body": {"text", "character varying"},
        "owner_user_id": {"bigint"},
        "creation_date": {"timestamp without time zone"},
    }


def test_family_types_accept_any_type_of_each_fields_family() -> None:
    contract = family_types(post_fields())

    assert list(contract) == [column.name for column in post_fields()]
    assert contract == {
        "id": INTEGERS,
        "title": TEXTS,
        "body": TEXTS,
        "owner_user_id": INTEGERS,
        "creation_date": TIMESTAMPS,
    }


@pytest.mark.parametrize(
    ("actual", "contract_of", "expected"),
    [
        pytest.param(ANALYTICAL_COLUMNS, exact_types, [], id="analytical table ok"),
        pytest.param(ANALYTICAL_COLUMNS, family_types, [], id="as a source ok"),
        pytest.param(OTHER_SOURCE_COLUMNS, family_types, [], id="other types of the families"),
        pytest.param(
            OTHER_SOURCE_COLUMNS,
            exact_types,
            [
                "column id is integer, expected bigint",
                "column owner_user_id is integer, expected bigint",
                "column creation_date is timestamp with time zone, "
                "expected timestamp without time zone",
            ],
            id="other types in a table we own",
        ),
        pytest.param(
            {name: t for name, t in ANALYTICAL_COLUMNS.items() if name != "body"},
            family_types,
            ["column body is missing"],
            id="missing column",
        ),
        pytest.param(
            {**ANALYTICAL_COLUMNS, "creation_date": "text"},
            family_types,
            [
                "column creation_date is text, "
                "expected timestamp with time zone or timestamp without time zone"
            ],
            id="wrong type",
        ),
        pytest.param(
            {**ANALYTICAL_COLUMNS, "body": "integer"},
            exact_types,
            ["column body is integer, expected character varying or text"],
            id="wrong type in a table we own",
        ),
        pytest.param(
            {},
            exact_types,
            [f"column {name} is missing" for name in ANALYTICAL_COLUMNS],
            id="no columns",
        ),
    ],
)
def test_contract_problems_name_each_missing_or_mistyped_column(
    actual: dict[str, str], contract_of, expected: list[str]
) -> None:
    assert contract_problems(actual, contract_of(post_fields())) == expected


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("<p>a body</p>", "&lt;p&gt;a body&lt;/p&gt;"),
        ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
        ("a | b", r"a \| b"),
        ('<a href="x|y">&</a>', r"&lt;a href=&quot;x\|y&quot;&gt;&amp;&lt;/a&gt;"),
        ("two\nlines\r\n  here", "two lines here"),
        (None, ""),
        (2**40, "1099511627776"),
    ],
)
def test_markdown_table_cells_are_literal_text_on_one_line(value: object, cell: str) -> None:
    table = markdown_table(["id", "body"], [[1, value], [2, "next"]]).value
    assert isinstance(table, str)

    lines = table.split("\n")
    assert lines == ["| id | body |", "|---|---|", f"| 1 | {cell} |", "| 2 | next |"]
    cells = re.split(r"(?<!\\)\|", lines[2])  # a table's cells end at unescaped pipes only
    assert len(cells) == 4  # the empty text before the first pipe and after the last


def test_whitespace_ranges_are_exactly_the_characters_python_calls_whitespace() -> None:
    listed = [c for low, high in WHITESPACE_RANGES for c in range(low, high + 1)]

    assert set(listed) == {c for c in range(sys.maxunicode + 1) if chr(c).isspace()}
    assert len(listed) == len(set(listed))  # no range overlaps another


def test_the_non_whitespace_regex_matches_every_character_but_those_ranges() -> None:
    # Only \uXXXX escapes inside one negated bracket: the syntax PostgreSQL's AREs and
    # Python's re read alike, so Python can check the set it denotes.
    assert re.fullmatch(r"\[\^(\\u[0-9a-f]{4}(-\\u[0-9a-f]{4})?)+\]", NON_WHITESPACE_REGEX)
    every_character = "".join(map(chr, range(sys.maxunicode + 1)))

    matched = {ord(c) for c in re.findall(NON_WHITESPACE_REGEX, every_character)}

    whitespace = {c for c in range(sys.maxunicode + 1) if chr(c).isspace()}
    assert matched == set(range(sys.maxunicode + 1)) - whitespace
