"""Host allocator settings of an actor: freed blocks kept for reuse, and huge pages.

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with fresh ``mmap``s and
unmaps them on free, so every large temporary -- a batch's logits, distance matrices, upsampled
maps, decoded images -- is faulted in page by page and zeroed by the kernel again each time it
is allocated. On the CPU that was a quarter of the actor's CPU per image (docs/benchmarks.md,
"Allocator: freed blocks kept for reuse"). Raising the mmap and trim thresholds keeps freed blocks in the heap for reuse; the
actor's resident memory then stays at its peak working set instead of shrinking between
batches, which is what a long-lived actor holds anyway, plus fragmentation: a few of the
largest blocks (measured: peak RSS of a 1080p CPU actor +1-3%, flat from 100 to 1,600 images,
bench/shard_memory.py). Other C libraries: nothing to do.

Transparent huge pages (:func:`actor_env`): PyTorch's CPU allocator asks the kernel for huge
pages for blocks of 2 MB and more when ``THP_MEM_ALLOC_ENABLE=1`` is in its process's
environment before torch first allocates, so only whoever starts the process can set it: the
driver gives it to the actors it starts. It pays for the SAM 3 family on a CPU; the CLIP
family gained nothing measurable (docs/benchmarks.md, "Allocator: huge pages"), so by default
it follows the method's family. No labels change (measured on both families).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from cliptrase.config import method_family

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap. A glibc that refuses a threshold this high (mallopt
# returns 0) keeps its defaults; that is logged, not an error.
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = 1 << 30


def reuse_freed_memory() -> bool:
    """Set glibc's thresholds (once per process; idempotent); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    done = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and done
    if not done:
        log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return done


HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
# Families whose CPU forward is faster with huge pages (measured, same labels): SAM 3's large
# per-prompt activations (e.g. 16 x 200 x 5184 box biases) are allocated fresh per forward.
# The CLIP family gained nothing measurable (ratios 0.92-1.16 over 10 pairs), so it keeps the
# process's own setting.
HUGE_PAGE_FAMILIES = frozenset({"sam3"})


def actor_env(method: str, huge_pages: bool | None = None) -> dict[str, str]:
    """Environment variables for an actor's process: huge pages as ``huge_pages`` says, or,
    when None, on for the families in :data:`HUGE_PAGE_FAMILIES`; empty (the actor inherits
    its environment as it is) for the other families."""
    if huge_pages is None and method_family(method) in HUGE_PAGE_FAMILIES:
        huge_pages = True
    return {} if huge_pages is None else {HUGE_PAGES_ENV: "1" if huge_pages else "0"}


def actor_options(method: str, huge_pages: bool | None = None) -> dict:
    """Ray options that start an actor's process with :func:`actor_env` (merged with the job's
    ``runtime_env``); none when there is nothing to set."""
    env = actor_env(method, huge_pages)
    return {"runtime_env": {"env_vars": env}} if env else {}


def huge_pages_enabled() -> bool:
    """Whether this process was started with PyTorch's huge pages."""
    return os.environ.get(HUGE_PAGES_ENV) == "1"
