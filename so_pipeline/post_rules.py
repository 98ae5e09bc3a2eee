"""Which posts are kept, and why the others are rejected.

The rules run inside the source's SELECT, so rows are classified by PostgreSQL while they
stream, with no per-row Python. "Whitespace" is Python's `str.isspace()` set (Unicode White_Space
plus the ASCII separators U+001C..U+001F); a test checks the two definitions agree.
"""

import codecs
from enum import StrEnum

# Inclusive code point ranges of the characters `str.isspace()` accepts.
WHITESPACE_RANGES: tuple[tuple[int, int], ...] = (
    (0x0009, 0x000D),
    (0x001C, 0x0020),
    (0x0085, 0x0085),
    (0x00A0, 0x00A0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
)


class RejectReason(StrEnum):
    BODY_NULL = "body_null"
    BODY_EMPTY = "body_empty"
    BODY_WHITESPACE_ONLY = "body_whitespace_only"
    OWNER_NULL = "owner_null"


def _regex_range(low: int, high: int) -> str:
    return f"\\u{low:04x}" if low == high else f"\\u{low:04x}-\\u{high:04x}"


# A PostgreSQL ARE that matches any character outside WHITESPACE_RANGES.
NON_WHITESPACE_REGEX = "[^" + "".join(_regex_range(lo, hi) for lo, hi in WHITESPACE_RANGES) + "]"

# Evaluates to NULL for a post that is kept, else to its RejectReason; every value in it is a
# bound parameter, supplied by `rule_params`. The first character is checked before the whole
# body: PostgreSQL reads just that slice of a large (TOASTed) body, and its regex engine first
# converts its whole input to wide characters, so a body that starts visibly (nearly all do)
# costs one character. This took the classification of 1M posts from 0.55 s to 0.25 s. A
# first character that is printable ASCII ('!' to '~', never whitespace, the same code in
# every encoding the rules accept) skips the regex engine: ~0.1 s less of the source's CPU
# per 1M posts.
REJECT_REASON_SQL = """CASE
    WHEN body IS NULL THEN %(body_null)s
    WHEN body = '' THEN %(body_empty)s
    WHEN ascii(left(body, 1)) NOT BETWEEN 33 AND 126
        AND left(body, 1) !~ %(non_whitespace)s AND body !~ %(non_whitespace)s
        THEN %(body_whitespace_only)s
    WHEN %(require_owner)s AND owner_user_id IS NULL THEN %(owner_null)s
END"""


class UnsupportedEncodingError(ValueError):
    """A database encoding in which the whitespace rule cannot be applied to characters."""


def python_codec(server_encoding: str) -> str:
    """Python's codec for a PostgreSQL server encoding (e.g. WIN1252 -> cp1252)."""
    name = server_encoding.upper()
    if name in ("UTF8", "UTF-8"):
        return "utf-8"
    if name == "SQL_ASCII":
        raise UnsupportedEncodingError(
            "the database encoding is SQL_ASCII, which stores bytes without saying which "
            "characters they are, so whitespace cannot be told apart; use a database in "
            "UTF8 (or another real encoding)"
        )
    candidates = [name, name.replace("WIN", "cp", 1), name.replace("KOI8", "koi8_", 1)]
    for candidate in candidates:
        try:
            return codecs.lookup(candidate).name
        except LookupError:
            continue
    raise UnsupportedEncodingError(
        f"the database encoding {server_encoding} has no Python codec to check the whitespace "
        "rule against; use a database in UTF8"
    )


def non_whitespace_regex(server_encoding: str = "UTF8") -> str:
    """NON_WHITESPACE_REGEX as a database in `server_encoding` must be given it.

    PostgreSQL reads a regex escape such as \\u0085 as a code in the database's own encoding
    (in WIN1252, byte 0x85 is "…"), so outside UTF8 the class lists the whitespace characters
    themselves, those the encoding has: the client sends them in UTF8 and the server converts
    each to its own code.
    """
    codec = python_codec(server_encoding)
    if codec == "utf-8":
        return NON_WHITESPACE_REGEX
    characters = []
    for low, high in WHITESPACE_RANGES:
        for code in range(low, high + 1):
            try:
                chr(code).encode(codec)
            except UnicodeEncodeError:
                continue
            characters.append(chr(code))
    return "[^" + "".join(characters) + "]"


def rule_params(require_owner: bool, server_encoding: str = "UTF8") -> dict[str, object]:
    """The bound parameters of REJECT_REASON_SQL, for a source database in `server_encoding`."""
    reasons: dict[str, object] = {reason.value: reason.value for reason in RejectReason}
    return {
        **reasons,
        "non_whitespace": non_whitespace_regex(server_encoding),
        "require_owner": require_owner,
    }
