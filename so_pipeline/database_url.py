"""Database URLs: parsed, turned into libpq's connection string, and named in messages without
their password. Imports no Dagster, so `load-dump` shares it with the resource."""

import sqlalchemy as sa

ACCEPTED_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


class InvalidDatabaseURL(ValueError):
    """A URL that cannot name a PostgreSQL database (the message never holds its password)."""


def parse_url(raw_url: str, name: str) -> sa.URL:
    """Parse a `postgresql://` or `postgresql+psycopg://` URL; fail naming the database."""
    try:
        url = sa.make_url(raw_url.strip())
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise InvalidDatabaseURL(
            f"{name}: the database URL is not a valid URL "
            "(expected postgresql://user:password@host:port/dbname)"
        ) from None
    if url.port is not None and not 0 < url.port < 65536:
        raise InvalidDatabaseURL(f"{name}: port {url.port} is out of range (1 to 65535)")
    if url.drivername not in ACCEPTED_SCHEMES:
        raise InvalidDatabaseURL(
            f"{name}: unsupported URL scheme '{url.drivername}': not a PostgreSQL URL (use one "
            f"of {', '.join(s + '://' for s in ACCEPTED_SCHEMES)})"
        )
    return url


def libpq_conninfo(url: sa.URL) -> str:
    """The URL as libpq reads it (its query string, e.g. sslmode, passes through)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def describe_location(url: sa.URL) -> str:
    """`host:port/dbname` for messages; never includes credentials."""
    host = url.host or url.query.get("host") or "local socket"
    if isinstance(host, tuple):
        host = ",".join(host)
    port = f":{url.port}" if url.port else ""
    return f"{host}{port}/{url.database or ''}"


def scrub(text: str, secret: str | None) -> str:
    """`text` on one line, with `secret` (a password) replaced by ***."""
    line = " ".join(text.split())
    return line.replace(secret, "***") if secret else line
