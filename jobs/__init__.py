"""User-facing entrypoints, each run as ``python -m jobs.<name>`` locally or via ``ray job submit``."""
