"""The model hub, offline: answer from the local cache at once instead of retrying for a minute.

huggingface_hub retries an unreachable hub with backoff (~50 s, twenty-odd log lines) before
it gives up. Before any hub download, :func:`offline_if_unreachable` opens one TCP connection
to the hub (3 s at most); if none opens, it sets ``HF_HUB_OFFLINE=1`` for this process (and
the processes it starts, e.g. local Ray actors), so cached weights load at once and missing
ones fail at once with :data:`OFFLINE_ADVICE`. The library and the command line share this,
so both fail as fast and say the same.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("cliptrase")

HUB_HOST = ("huggingface.co", 443)
OFFLINE_ADVICE = (
    "pass a local checkpoint (CLI: --weights PATH, or an s3:// URI; Python: pretrained=PATH), "
    "or random weights for a plumbing check (CLI: --random-weights; Python: pretrained=None)"
)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection (a few seconds at most)."""
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def offline_if_unreachable() -> bool:
    """``HF_HUB_OFFLINE=1`` when the hub cannot be reached (and in huggingface_hub, which
    reads it once at import); returns whether the hub is offline now."""
    if hub_offline():
        return True
    if hub_reachable():
        return False
    log.debug("the model hub is unreachable: using only weights already cached")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - open_clip and sam3 both depend on it
        pass
    return True


def not_cached_message(what: str) -> str:
    """The one line both the library and the CLI give for weights the hub cannot supply."""
    return (
        f"the weights {what} are not in the local cache and the model hub is offline or "
        f"unreachable: {OFFLINE_ADVICE}"
    )
