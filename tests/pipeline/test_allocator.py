"""pipeline.allocator: a large block freed and allocated again is not faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Minor page faults of the second of two 64 MiB allocations (above glibc's largest dynamic
# mmap threshold, 32 MiB), each written once and freed.
PROBE = """
import json, resource, sys
import torch
sys.path.insert(0, sys.argv[1])
from pipeline.allocator import reuse_freed_memory
done = reuse_freed_memory() if sys.argv[2] == "reuse" else None
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(64 << 20, dtype=torch.uint8)
    block[::4096] = 1  # touch every page
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_round()
print(json.dumps({"done": done, "faults": faults_of_one_round()}))
"""


def _second_round_faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), mode], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    pages = (64 << 20) // 4096
    system = _second_round_faults("system")
    reused = _second_round_faults("reuse")
    assert reused["done"] is True
    assert system["faults"] > pages // 2  # mmap'd afresh: every page faults again
    assert reused["faults"] < pages // 20  # the heap's pages, already resident
