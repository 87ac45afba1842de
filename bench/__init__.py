"""Benchmarks: each module starts a private stack, measures and prints a table.

Run one with ``python -m bench.<name>``; ``--quick`` runs it at a small scale.
``docs/benchmarks.md`` describes each benchmark and records measured figures.
"""
