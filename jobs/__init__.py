"""User-facing entrypoints, each run as ``python -m jobs.<name>`` locally or via ``ray job submit``."""

import os

# torch and scikit-learn (DBSCAN) each bring an OpenMP runtime; with the default active wait
# policy their idle threads can spin against each other, and CPU runs were seen 5-10x slower
# at random (docs/benchmarks.md). Set before torch loads; a user's own setting wins. Local Ray
# workers inherit it from this process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
