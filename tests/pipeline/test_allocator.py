"""pipeline.allocator: large blocks freed and allocated again are reused, not faulted in again.

That the actor's memory stays flat over long shards with it (the pipeline's real allocation
pattern) is tests/pipeline/test_shard_memory.py's, which runs with it on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)
ROUNDS = 16

# Each round allocates a BLOCK-sized tensor, touches every page and frees it. Reported: minor
# page faults of the last round, and resident memory growth over all rounds after the first.
PROBE = """
import json, resource, sys
import torch
sys.path.insert(0, sys.argv[1])
from pipeline.allocator import reuse_freed_memory
done = reuse_freed_memory() if sys.argv[2] == "reuse" else None
block, rounds = int(sys.argv[3]), int(sys.argv[4])
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
for r in range(rounds):
    if r == 1:
        base = resident()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(block, dtype=torch.uint8)
    x[::4096] = 1
    del x
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"done": done, "faults": faults, "growth": resident() - base}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), mode, str(BLOCK), str(ROUNDS)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_and_the_heap_stays_bounded():
    pages = BLOCK // 4096
    system = _probe("system")
    reused = _probe("reuse")
    assert reused["done"] is True
    assert system["faults"] > pages // 2  # mmap'd afresh: every page faults again
    assert reused["faults"] < pages // 20  # the heap's pages, already resident
    # The first rounds can leave up to ~6 blocks in the heap before it reuses them; not one
    # per round (15).
    assert reused["growth"] < 10 * BLOCK


def test_huge_pages_follow_the_methods_family_unless_set():
    from pipeline.allocator import HUGE_PAGES_ENV, actor_env

    assert actor_env("activesam") == actor_env("sam3") == {HUGE_PAGES_ENV: "1"}
    assert actor_env("cliptrase") == actor_env("mypkg.seg:build") == {}  # environment's own
    assert actor_env("cliptrase", huge_pages=True) == {HUGE_PAGES_ENV: "1"}
    assert actor_env("segearthov3", huge_pages=False) == {HUGE_PAGES_ENV: "0"}
    with pytest.raises(ValueError, match="unknown method"):
        actor_env("no-such-method")


# A 64 MiB tensor, every page touched: how much of the process's anonymous memory the kernel
# backs with huge pages.
HUGE_PROBE = """
import torch
x = torch.empty(64 << 20, dtype=torch.uint8)
x[::4096] = 1
rollup = open("/proc/self/smaps_rollup").read().splitlines()
print(next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:")))
"""


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[", 1)[1].split("]", 1)[0]


@pytest.mark.skipif(_thp_mode() != "madvise", reason="the kernel's THP mode is not madvise")
def test_the_huge_pages_variable_is_the_one_torch_reads():
    """The setting actor_env passes on is PyTorch's: with it the tensor lands in huge pages,
    without it not (THP in madvise mode: only memory asked for gets them)."""
    from pipeline.allocator import HUGE_PAGES_ENV

    def huge_kib(value: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
        out = subprocess.run(
            [sys.executable, "-c", HUGE_PROBE],
            env={**env, HUGE_PAGES_ENV: value},
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return int(out.stdout)

    assert huge_kib("0") < 8 << 10
    assert huge_kib("1") >= 32 << 10  # at least half of the 64 MiB
