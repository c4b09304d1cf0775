"""``python -m jobs.runs``: the runs under a labelling output, the most recent first.

Several runs under one ``--output`` are normal (another model, method or vocabulary each get
their own config-hash prefix). Every reader (export, visualize, review, report) takes the most
recent by default; ``--config-hash`` (any prefix of one listed here) chooses another.

    python -m jobs.runs --labels outputs/sample/labels
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pipeline.outputs import RunInfo, list_runs

from . import _cli


def table(runs: Sequence[RunInfo]) -> str:
    """The runs as an aligned text table."""
    header = ("config hash", "last run", "method", "model", "weights", "labels", "ok", "errors")
    rows = [
        (
            run.config_hash,
            run.last_run_at[:19].replace("T", " ") or "-",
            run.method or "?",
            run.model or "?",
            "RANDOM" if run.random_weights else (run.weights or "?"),
            str(run.labels),
            str(run.images_ok),
            str(run.images_error),
        )
        for run in runs
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in (header, *rows)]  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--labels", required=True, help="a labelling run's --output (or URI)")
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    _cli.add_job_args(parser, progress=False)
    return parser


@_cli.exit_on_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args, options = _cli.parse_job_args(build_parser(), argv)
    runs = list_runs(args.labels, options)
    if not runs:
        raise _cli.CliError(f"no labelling run under {args.labels}")
    if args.json:
        for run in runs:
            print(json.dumps(run.__dict__, sort_keys=True))
    else:
        print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
