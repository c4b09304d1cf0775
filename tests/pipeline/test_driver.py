"""The job's driver schedules and commits; it never loads a model, so it never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import json, resource, sys
import numpy as np
from PIL import Image
import jobs.export, jobs.label, jobs.schedule, jobs.visualize  # what a user's entrypoint loads
import pipeline
from tests.pipeline.conftest import tiny_config

inputs, output = sys.argv[1], sys.argv[2]
for i in range(3):
    pixels = np.random.default_rng(i).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(f"{inputs}/{i}.png")
summary = pipeline.run(tiny_config([inputs], output, num_actors=1), progress=False)
print(json.dumps({
    "images_ok": summary.images_ok,
    "heavy_modules": [m for m in ("torch", "open_clip", "sklearn") if m in sys.modules],
    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
}))
"""


def test_a_run_labels_images_without_the_driver_importing_torch(tmp_path):
    (tmp_path / "in").mkdir()
    env = {**os.environ, "RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path / "in"), str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["images_ok"] == 3  # the actors did load the model and label
    assert report["heavy_modules"] == [], report  # the driver did not
