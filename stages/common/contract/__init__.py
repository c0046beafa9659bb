"""The contract every stage shares, the lowest floor: checkpoint directories and their manifest, configs, the
sample schema, errors, console output, trackers, plots and the variant tables. Imports nothing else of the project
(except, lazily, the tiny world to resolve a `tiny` spec)."""

__version__ = "0.1.0"   # what a manifest records as the prism version (pyproject.toml holds the same)
