"""The plan: the memory model of a run and the `--dry-run` report built from it."""
