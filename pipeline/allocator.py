"""Keep the host allocator from returning large freed blocks to the kernel.

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with fresh ``mmap``s and
unmaps them on free, so every large temporary -- a batch's logits, distance matrices, upsampled
maps, decoded images -- is faulted in page by page and zeroed by the kernel again each time it
is allocated. On the CPU that was a quarter of the actor's CPU per image (docs/benchmarks.md,
"Allocator: freed blocks kept for reuse"). Raising the mmap and trim thresholds keeps freed blocks in the heap for reuse; the
actor's resident memory then stays at its peak working set instead of shrinking between
batches, which is what a long-lived actor holds anyway, plus fragmentation: a few of the
largest blocks (measured: peak RSS of a 1080p CPU actor +1-3%, flat from 100 to 1,600 images,
bench/shard_memory.py). Other C libraries: nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

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
