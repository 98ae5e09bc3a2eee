"""so_pipeline: incremental Stack Overflow posts sync from a source to an analytical PostgreSQL.

Importing the package builds nothing: `so_pipeline.defs` (what `dagster ... -m so_pipeline`
loads) is imported from `so_pipeline.definitions` on first access, so the local tooling in
`so_pipeline.tooling` can be imported without loading Dagster's whole code location.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "defs":
        from so_pipeline.definitions import defs

        return defs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # Dagster finds a module's Definitions by listing its attributes.
    return [*globals(), "defs"]
