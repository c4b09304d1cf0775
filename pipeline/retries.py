"""Which storage errors are worth retrying, and the bounded retry around whole operations.

Two layers. Inside each request the storage client retries on its own (botocore's retry modes
for s3fs; set them with ``storage_options={"config_kwargs": {"retries": {...}}}``). Around a
whole bookkeeping operation (a lease, a marker, a listing) :func:`with_retries` adds a slower
outer retry with tenacity, so a store that is away for ~15-45 s costs a pause, not the run.
What stays ours is the classification: fsspec backends raise their clients' own exception
types, so :func:`is_transient` names the few that mean "try again".
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

import tenacity

log = logging.getLogger("pipeline")

_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
# Top-level packages whose exceptions are network/service failures (connection resets,
# timeouts, 5xx and throttling) when they reach us: fsspec translates the permanent ones
# (missing key, access denied) into the OSError subclasses above first.
_TRANSIENT_MODULES = (
    "botocore",
    "aiobotocore",
    "aiohttp",
    "urllib3",
    "requests",
    "google",
    "gcsfs",
    "adlfs",
    "azure",
)


def is_transient(exc: BaseException) -> bool:
    """Connection resets, timeouts, 5xx/throttling and unreachable endpoints: worth a retry."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in (errno.EINVAL, errno.ENOENT, errno.EACCES, errno.EPERM)
    return type(exc).__module__.split(".", 1)[0] in _TRANSIENT_MODULES


def _log_retry(state: tenacity.RetryCallState) -> None:
    log.warning(
        "storage: %s failed (%s); retry %d in %.1fs",
        getattr(state.fn, "__name__", "call"),
        type(state.outcome.exception()).__name__,
        state.attempt_number,
        state.next_action.sleep if state.next_action else 0.0,
    )


def with_retries(
    fn: Callable[..., Any], *args: Any, attempts: int = 6, first_backoff_s: float = 0.5, **kwargs
) -> Any:
    """``fn(*args, **kwargs)``, retried on transient storage errors with bounded backoff.

    0.5, 1, 2, 4, 8 s between six attempts (plus the client's own retries inside each); then
    the last error propagates as itself.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=first_backoff_s, min=first_backoff_s, max=8.0),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=_log_retry,
        reraise=True,
    )
    return retrying(fn, *args, **kwargs)
