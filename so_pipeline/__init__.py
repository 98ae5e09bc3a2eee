"""so_pipeline: incremental Stack Overflow posts sync from a source to an analytical PostgreSQL."""

from so_pipeline.definitions import defs

__all__ = ["defs"]
