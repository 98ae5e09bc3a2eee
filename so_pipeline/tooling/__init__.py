"""Local tooling: the demo, the UI launcher, status and dump loading (not loaded by Dagster)."""
