"""Review selections on disk: ``selection.json`` and ``selection.csv``, written by
``jobs.review`` and read by ``jobs.review_export`` and ``jobs.report``, and the provenance
every review file carries."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from pipeline.outputs import LabelledRun
from pipeline.store import output_folder

from . import _cli

SELECTION_FILE = "selection.json"
SELECTION_CSV = "selection.csv"
REVIEW_DIR = "_review"


def provenance(run: LabelledRun) -> dict[str, Any]:
    """Where labels came from: config hash, model, weights identity, random or not."""
    out = {**run.provenance(), "names": run.names}
    if run.random_weights:
        out["note"] = _cli.RANDOM_WEIGHTS_BANNER
    return out


def selection_csv(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "rank",
            "image_id",
            "chosen_by",
            "reason",
            "mean_confidence",
            "low_confidence_share",
            "disagreement",
            "rarity",
            "classes",
            "source_uri",
        ]
    )
    for entry in doc["selected"]:
        writer.writerow(
            [
                entry["rank"],
                entry["image_id"],
                entry["chosen_by"],
                entry["reason"],
                f"{entry['mean_confidence']:.4f}",
                f"{entry['low_confidence_share']:.4f}",
                "" if entry["disagreement"] is None else f"{entry['disagreement']:.4f}",
                ""
                if entry["scores"]["rare-class"] is None
                else f"{entry['scores']['rare-class']:.4f}",
                ";".join(entry["classes"]),
                entry["source_uri"],
            ]
        )
    return buf.getvalue()


def default_out(run: LabelledRun) -> str:
    return f"{run.layout.uri.rstrip('/')}/{REVIEW_DIR}"


def write_selection(doc: dict[str, Any], out: str, storage_options: dict | None = None) -> str:
    """Write ``selection.json`` and ``selection.csv`` under ``out``; returns the JSON's URI."""
    folder = output_folder(out, storage_options)
    folder.put(SELECTION_FILE, json.dumps(doc, indent=2).encode())
    folder.put(SELECTION_CSV, selection_csv(doc).encode())
    return f"{out.rstrip('/')}/{SELECTION_FILE}"


def load_selection(path: str, storage_options: dict | None = None) -> dict[str, Any]:
    """A selection written by :func:`write_selection`: its JSON file, or the folder holding it."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    root = root.rstrip("/")
    if not root.endswith(".json"):
        root = f"{root}/{SELECTION_FILE}"
    try:
        with fs.open(root, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise _cli.CliError(f"no review selection at {path}") from None
    except json.JSONDecodeError as err:
        raise _cli.CliError(f"{path} is not a selection file: {err}") from None
    if doc.get("kind") != "cliptrase-review-selection" or "selected" not in doc:
        raise _cli.CliError(f"{path} is not a selection written by jobs.review")
    return doc


def find_selection(run: LabelledRun, storage_options: dict | None = None) -> dict | None:
    """The selection beside the run (``_review/selection.json``), if one was written there."""
    path = f"{run.layout.root}/{REVIEW_DIR}/{SELECTION_FILE}"
    if not run.layout.fs.exists(path):
        return None
    return load_selection(run.layout.fs.unstrip_protocol(path), storage_options)
