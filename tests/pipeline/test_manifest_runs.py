"""Every run (scheduler tick) is recorded, also when two finish at the same instant."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone

from pipeline.layout import RunLayout
from pipeline.ledger import new_run_id, read_manifest, record_run

CONFIG = {"config_hash": "cfg"}


def _run(layout: RunLayout, shards_done: int) -> dict:
    run = {
        "run_id": new_run_id(datetime.now(timezone.utc)),
        "started_at": datetime.now(timezone.utc).isoformat(),
        "shards_done": shards_done,
    }
    return record_run(layout, config=CONFIG, metadata=None, run=run)


def test_a_run_entry_lost_to_a_racing_manifest_write_comes_back_with_the_next_run(tmp_path):
    layout = RunLayout.open(str(tmp_path), "cfg")
    layout.makedirs()
    _run(layout, 1)
    only_first = layout.fs.cat_file(layout.manifest_path)
    _run(layout, 2)
    # a concurrent run that read the manifest before run 2 wrote it now overwrites it
    layout.fs.pipe_file(layout.manifest_path, only_first)
    assert [r["shards_done"] for r in read_manifest(layout)["runs"]] == [1]
    manifest = _run(layout, 3)
    assert [r["shards_done"] for r in manifest["runs"]] == [1, 2, 3]
    assert json.loads(layout.fs.cat_file(layout.manifest_path)) == manifest


def test_runs_finishing_together_are_all_recorded(tmp_path):
    layout = RunLayout.open(str(tmp_path), "cfg")
    layout.makedirs()
    start = threading.Barrier(8)
    errors = []

    def finish(n):
        start.wait()
        try:
            _run(layout, n)
        except Exception as exc:  # noqa: BLE001 - e.g. a half-written manifest.json read back
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    manifest = _run(layout, 99)  # the next tick indexes whatever the race dropped
    assert sorted(r["shards_done"] for r in manifest["runs"]) == [*range(8), 99]
    assert len({r["run_id"] for r in manifest["runs"]}) == 9


def test_recording_the_same_run_twice_indexes_it_once(tmp_path):
    layout = RunLayout.open(str(tmp_path), "cfg")
    layout.makedirs()
    run = {"run_id": new_run_id(datetime.now(timezone.utc)), "started_at": "x", "shards_done": 1}
    record_run(layout, config=CONFIG, metadata=None, run=run)
    manifest = record_run(layout, config=CONFIG, metadata=None, run=run)  # a retried call
    assert [r["run_id"] for r in manifest["runs"]] == [run["run_id"]]
