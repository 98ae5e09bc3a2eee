"""Deterministic synthetic Stack Overflow posts, generated inside PostgreSQL.

Shape (matching what the benchmark issue asks for): ids increasing with gaps (a few of
millions); about half answers with NULL titles; HTML bodies with a log-normal length (median
near 700 characters, mean near 1,200, capped at 40,000); some non-ASCII text; about 1% NULL,
1% empty and 0.5% whitespace-only bodies; about 3% NULL owners; dates over 2008-2024.
"""

import psycopg

from so_pipeline.tooling.dump_loader import create_posts_table

# mu = ln(700); sigma from mean/median = exp(sigma^2 / 2) = 1200 / 700.
_LOG_MEDIAN = 6.551
_LOG_SIGMA = 1.038

_GENERATE = """
INSERT INTO posts (id, post_type_id, title, body, owner_user_id, creation_date, score)
SELECT
    id,
    CASE WHEN is_answer THEN 2 ELSE 1 END,
    CASE WHEN is_answer THEN NULL
         ELSE 'How do I ' || md5(g::text) || ' in ' || (ARRAY['Python', 'SQL', 'C#', 'Rust',
              'JavaScript', 'Java', 'Go', 'Kotlin'])[1 + g %% 8] || '?' END,
    CASE WHEN r_body < 0.01 THEN NULL
         WHEN r_body < 0.02 THEN ''
         WHEN r_body < 0.025 THEN (ARRAY[' ', E'\\n\\n', E' \\t ', E'\\u00a0', E'\\u2003 \\u2028'])
                                  [1 + g %% 5]
         ELSE left(repeat(
             CASE WHEN r_text < 0.1
                  THEN '<p>Ünïcödé: naïve café – “quoted” 日本語 🙂 ' || g || '</p>'
                       || E'\\n'
                  ELSE '<p>I tried <code>foo(' || g %% 997 || ')</code> but it fails with '
                       || '&quot;error&quot;; see the snippet below.</p>' || E'\\n'
                       || '<pre><code>for i in range(10):\\n    print(i)</code></pre>' || E'\\n'
             END, 1 + body_length / 60), body_length)
    END,
    CASE WHEN r_owner < 0.03 THEN NULL ELSE 1 + (g::bigint * 7919) %% 2000000 END,
    timestamp '2008-08-01' + (g::float8 / %(rows)s) * interval '16 years'
        + (r_text * 1000000)::int * interval '1 microsecond',
    (g %% 50) - 5
FROM (
    SELECT g,
           sum(1 + (random() * 2)::int + CASE WHEN random() < 0.00002 THEN 5000000 ELSE 0 END)
               OVER (ORDER BY g) AS id,
           random() < 0.5 AS is_answer,
           random() AS r_body, random() AS r_text, random() AS r_owner,
           least(40000, greatest(5, exp(%(log_median)s + %(log_sigma)s
                 * sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()))))::int AS body_length
    FROM generate_series(1, %(rows)s) AS g
) AS s
"""


def generate_posts(database_url: str, rows: int, seed: float = 0.42) -> None:
    """Create `posts` (the dump schema) and fill it with `rows` synthetic posts."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        create_posts_table(connection)
        with connection.transaction():
            connection.execute("SELECT setseed(%s)", [seed])
            connection.execute(
                _GENERATE,
                {"rows": rows, "log_median": _LOG_MEDIAN, "log_sigma": _LOG_SIGMA},
            )
        connection.execute("VACUUM ANALYZE posts")


def describe_posts(database_url: str) -> dict[str, float]:
    """Figures to check the shape against the spec, and the source size in MB."""
    with psycopg.connect(database_url) as connection:
        row = connection.execute(
            """SELECT count(*), max(id),
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY length(body)),
                  avg(length(body)), max(length(body)),
                  avg((body IS NULL)::int), avg((body = '')::int), avg((title IS NULL)::int),
                  avg((owner_user_id IS NULL)::int),
                  sum(coalesce(octet_length(title), 0) + coalesce(octet_length(body), 0) + 24) / 1e6
               FROM posts"""
        ).fetchone()
    assert row is not None
    keys = (
        "rows",
        "max_id",
        "body_median",
        "body_mean",
        "body_max",
        "null_body",
        "empty_body",
        "null_title",
        "null_owner",
        "source_mb",
    )
    return {key: float(value or 0) for key, value in zip(keys, row, strict=True)}
