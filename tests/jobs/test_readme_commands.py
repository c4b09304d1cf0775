"""The README's commands, in its order, pasted into a shell on a copy of the checkout, offline.

The default first command must fail in one line (exit 2: no weights, no hub) that suggests
``--random-weights``; following that suggestion works too, and leaves a second run beside the
README's plumbing run, which every later command must take in its stride (the most recent
run, said). Every other command must exit 0. Each README command is asserted to appear
verbatim in README.md, so the README and this script cannot drift apart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FIRST_RUN = "python -m jobs.label --sample"
PLUMBING = "python -m jobs.label --sample --random-weights --model ViT-Tiny-16-test"
COMMANDS = [
    "python -m jobs.runs --labels outputs/sample/labels",
    "python -m jobs.export --labels outputs/sample/labels --out outputs/sample/mmseg --format folder --min-confidence 0.5",
    "python -m jobs.export --labels outputs/sample/labels --out outputs/sample/hf --format hf",
    "python -m jobs.visualize --labels outputs/sample/labels --out outputs/sample",
    "python -m jobs.review --labels outputs/sample/labels -n 50 --format cvat,labelstudio",
    "python -m jobs.review_export --labels outputs/sample/labels --selection auto --format fiftyone --out outputs/sample/review/fiftyone",
    "python -m jobs.report --labels outputs/sample/labels --out outputs/sample/report",
]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The checkout's files (tracked and new, not ignored) in a fresh folder: a clean clone."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
        text=True, check=True,
    ).stdout.split()  # fmt: skip
    target = tmp_path_factory.mktemp("clone")
    for name in listed:
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _shell(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command.replace("python ", f"{sys.executable} ", 1)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_the_readme_commands_work_as_pasted(checkout, tmp_path):
    readme = (REPO / "README.md").read_text()
    for command in [FIRST_RUN, PLUMBING, *COMMANDS]:
        assert command in readme, f"README.md no longer has: {command}"
    env = {
        **os.environ,
        "RAY_ADDRESS": "local",  # never join another Ray on this machine
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty-hub-cache"),
        "PYTHONPATH": str(checkout),
    }
    first = _shell(FIRST_RUN, checkout, env)
    lines = [line for line in first.stderr.splitlines() if line.strip()]
    assert first.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
        first.stderr[-2000:]
    )
    assert "--random-weights" in lines[0]
    # the README's plumbing line, then the error's own suggestion (ViT-B-16, random weights):
    # two runs under outputs/sample/labels, the suggestion's the most recent
    for command in (PLUMBING, f"{FIRST_RUN} --random-weights"):
        proc = _shell(command, checkout, env)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        assert proc.stderr.count("RANDOM weights") == 1, proc.stderr[-3000:]  # one banner
    for command in COMMANDS:
        proc = _shell(command, checkout, env)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        if command.startswith("python -m jobs.runs"):
            listed = proc.stdout.splitlines()
            assert len(listed) == 3 and "ViT-B-16" in listed[1] and "ViT-Tiny-16-test" in listed[2]
        else:
            assert "reading the most recent" in proc.stderr, f"{command}\n{proc.stderr[-2000:]}"
    sample = checkout / "outputs" / "sample"
    images = sorted(p.name for p in (sample / "mmseg" / "img_dir").rglob("*.jpg"))
    assert "astronaut.jpg" in images  # the trainer gets the images, named once (not .jpg.jpg)
    assert list(sample.glob("labels/*/shards/*.parquet"))
    assert (sample / "report" / "report.html").is_file()
    assert list((sample / "overlays").rglob("*.png")) and (sample / "areas.png").is_file()
    assert not (sample / "overlays" / "overlays").exists()
    assert list((sample / "hf").rglob("*.parquet")) and list((sample / "mmseg").rglob("*.png"))
