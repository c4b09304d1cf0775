"""jobs.label's FLOSS flags become the run config's FlossSpec; bad values are clear errors."""

from __future__ import annotations

import pytest

from jobs import _cli
from jobs.label import build_parser, config_from_args

BASE = ["in/", "--output", "out", "--classes", "person,cat", "--gpus-per-actor", "0"]


def _config(*flags: str):
    return config_from_args(build_parser().parse_args([*BASE, *flags]), {})


def test_floss_flags_set_the_floss_spec_and_the_hash():
    off = _config()
    on = _config("--floss", "--floss-sample", "16", "--floss-top-k", "2", "--floss-seed", "5")
    assert not off.floss.enabled
    assert (on.floss.enabled, on.floss.sample, on.floss.top_k, on.floss.seed) == (True, 16, 2, 5)
    assert on.config_hash() != off.config_hash()
    assert _config("--floss").floss.sample == 64 and _config("--floss").floss.top_k == 4


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--floss", "--floss-sample", "0"], "FLOSS sample must be at least 1"),
        (["--floss", "--floss-top-k", "0"], "FLOSS top_k must be at least 1"),
        (["--floss-top-k", "2"], "need --floss"),
    ],
)
def test_bad_floss_flags_are_clear_errors(flags, message):
    with pytest.raises(_cli.CliError, match=message):
        _config(*flags)
