"""The lock that keeps a test marked ``alone`` apart from the other pytest-xdist worker's tests
(tests/conftest.py): each claim is its own open file, as each worker's is."""

from __future__ import annotations

import threading
import time

from tests.conftest import MachineShare
from tests.reliability.fault_proxy import wait_for


def _claim(share: MachineShare, alone: bool, entered: list[str], name: str, leave: threading.Event):
    def hold() -> None:
        with share.hold(alone=alone):
            entered.append(name)
            leave.wait(10)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return thread


def _settle(entered: list[str], count: int) -> None:
    wait_for(lambda: len(entered) >= count, timeout_s=2.0)


def test_a_lone_test_waits_for_the_running_one_and_goes_before_tests_that_queue_after_it(
    tmp_path,
):
    entered: list[str] = []
    leave = {name: threading.Event() for name in ("running", "alone", "next")}
    running = _claim(MachineShare(tmp_path), False, entered, "running", leave["running"])
    _settle(entered, 1)
    alone = _claim(MachineShare(tmp_path), True, entered, "alone", leave["alone"])
    time.sleep(0.3)
    queued = _claim(MachineShare(tmp_path), False, entered, "next", leave["next"])
    time.sleep(0.3)
    assert entered == ["running"]  # the lone test waits; the next shared one waits at the gate

    leave["running"].set()
    running.join(5)
    _settle(entered, 2)
    time.sleep(0.3)
    assert entered == ["running", "alone"]  # alone, and before the test that queued after it

    leave["alone"].set()
    alone.join(5)
    _settle(entered, 3)
    assert entered == ["running", "alone", "next"]
    leave["next"].set()
    queued.join(5)


def test_shared_claims_run_together(tmp_path):
    entered: list[str] = []
    leave = threading.Event()
    threads = [_claim(MachineShare(tmp_path), False, entered, n, leave) for n in ("a", "b")]
    _settle(entered, 2)
    assert sorted(entered) == ["a", "b"]
    leave.set()
    for thread in threads:
        thread.join(5)
