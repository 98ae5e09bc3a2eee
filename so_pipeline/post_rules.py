"""Which posts are kept, and why the others are rejected.

The rules run inside the source's SELECT, so rows are classified by PostgreSQL while they
stream, with no per-row Python. "Whitespace" is Python's `str.isspace()` set (Unicode White_Space
plus the ASCII separators U+001C..U+001F); a test checks the two definitions agree.
"""

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
# costs one character. This took the classification of 1M posts from 0.55 s to 0.25 s.
REJECT_REASON_SQL = """CASE
    WHEN body IS NULL THEN %(body_null)s
    WHEN body = '' THEN %(body_empty)s
    WHEN left(body, 1) !~ %(non_whitespace)s AND body !~ %(non_whitespace)s
        THEN %(body_whitespace_only)s
    WHEN %(require_owner)s AND owner_user_id IS NULL THEN %(owner_null)s
END"""


def rule_params(require_owner: bool) -> dict[str, object]:
    reasons: dict[str, object] = {reason.value: reason.value for reason in RejectReason}
    return {**reasons, "non_whitespace": NON_WHITESPACE_REGEX, "require_owner": require_owner}
