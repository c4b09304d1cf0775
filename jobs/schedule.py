"""``python -m jobs.schedule``: incremental annotation, one tick at a time or every N seconds.

A tick lists the inputs, labels only the shards that have no committed output for this
config, and appends the tick (time, counts) to ``manifest.json``. Ticks are safe to overlap
(cron firing while the last one still runs, or two schedulers): each shard is leased on the
output store before it is labelled, and a lease expires (``--lease-ttl``) if its holder died.

    # from cron, once an hour, on a cluster (see README: Scheduled annotation)
    0 * * * *  ray job submit --address http://head:8265 --working-dir /opt/labels -- \\
        python -m jobs.schedule 's3://bucket/incoming/' --output s3://bucket/labels \\
        --class-file s3://bucket/classes.yaml

    # or as a long-lived process, a tick every 10 minutes
    python -m jobs.schedule 's3://bucket/incoming/' --output s3://bucket/labels \\
        --class-file classes.yaml --every 600
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from . import _cli
from .label import build_parser as build_label_parser
from .label import config_from_args, report, run_pipeline

log = logging.getLogger("jobs.schedule")


def build_parser() -> argparse.ArgumentParser:
    parser = build_label_parser()
    parser.prog = "python -m jobs.schedule"
    parser.description = __doc__
    tick = parser.add_argument_group("schedule")
    tick.add_argument(
        "--every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="run a tick every SECONDS, forever (default 0: one tick, for cron)",
    )
    tick.add_argument(
        "--max-ticks", type=int, default=None, help="stop after this many ticks (with --every)"
    )
    tick.add_argument(
        "--lease-ttl",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="a lease not renewed for this long is taken over (its holder is presumed dead); "
        "live runs renew theirs every min(ttl/3, 5 min) (default 900 s)",
    )
    return parser


@_cli.exit_on_user_errors
def main(argv: list[str] | None = None) -> int:
    args, options = _cli.parse_job_args(build_parser(), argv)
    if args.every < 0 or (args.max_ticks is not None and args.max_ticks < 1):
        raise _cli.CliError("--every must be >= 0 and --max-ticks >= 1")
    if args.lease_ttl <= 0:
        raise _cli.CliError("--lease-ttl must be positive")
    import ray

    import pipeline

    started_ray = False
    status = 0
    try:
        planning = dataclasses.replace(
            config_from_args(args, options, planning=True), lease_ttl_s=args.lease_ttl
        )
        ticks = 0
        while True:
            ticks += 1
            began = time.monotonic()
            # numbered across invocations: the runs the output's manifest records, plus one
            tick = pipeline.runner.runs_recorded(planning) + 1
            log.info("tick %d: listing %s", tick, ", ".join(planning.inputs))
            shards, pending = pipeline.plan(planning)
            if not pending:  # no Ray for nothing: recorded as an idle tick, summary untouched
                pipeline.run(planning, shards=shards, progress=False)
                log.info("tick %d: nothing new (%d shards, all committed)", tick, len(shards))
            else:
                if not ray.is_initialized():
                    log.info("tick %d: %d new shards; starting Ray", tick, len(pending))
                    ray.init(logging_level=logging.WARNING)
                    started_ray = True
                config = dataclasses.replace(
                    config_from_args(args, options), lease_ttl_s=args.lease_ttl
                )
                summary = run_pipeline(config, args, shards=shards)
                log.info(
                    "tick %d: %d new shards labelled, %d already done, %d leased by another run",
                    tick,
                    summary.shards_done,
                    summary.shards_skipped,
                    summary.shards_leased_elsewhere,
                )
                status = max(status, report(summary, config, args.max_error_rate))
            if not args.every or (args.max_ticks is not None and ticks >= args.max_ticks):
                break
            time.sleep(max(0.0, args.every - (time.monotonic() - began)))
    finally:
        if started_ray:
            ray.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
