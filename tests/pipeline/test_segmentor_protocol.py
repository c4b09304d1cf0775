"""The segmentor protocol is real: a segmentor of our own (a colour threshold, no CLIP, no
SAM 3) labels a run through ``jobs.label``'s path, on a real Ray actor, with exact rows; and
``pipeline/`` and ``jobs/`` import nothing of a segmentor family's internals."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import pipeline
from cliptrase.protocol import Segmentor

from .colour_segmentor import ColourThreshold, expected_labels
from .conftest import CORRUPT, make_tar, png

ROOT = Path(__file__).resolve().parents[2]
METHOD = "tests.pipeline.colour_segmentor:build"


def _pictures(n: int, seed: int = 0) -> list[np.ndarray]:
    """Blocks of pure-ish colours and dark patches: every class and background present."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        blocks = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
        blocks[0, 0] = (10, 20, 30)  # dark: background
        big = np.kron(blocks, np.ones((9 + i, 7 + i, 1), dtype=np.uint8))
        out.append(big)
    return out


def test_a_segmentor_of_our_own_satisfies_the_protocol():
    assert isinstance(ColourThreshold(), Segmentor)


def test_a_segmentor_of_our_own_labels_a_run_through_jobs_label_on_ray(tmp_path):
    pictures = _pictures(3)
    members = {f"{i}.png": png(Image.fromarray(p)) for i, p in enumerate(pictures)}
    members["9.jpg"] = CORRUPT
    make_tar(tmp_path / "colours.tar", members)
    proc = subprocess.run(
        [
            sys.executable, "-m", "jobs.label", str(tmp_path / "colours.tar"),
            "--output", str(tmp_path / "out"), "--method", METHOD,
            "--classes", "red,green,blue", "--background", "dark", "--no-progress",
            "--actors", "1", "--cpus-per-actor", "1",
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**__import__("os").environ, "RAY_ADDRESS": "local"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOM" not in proc.stderr + proc.stdout
    rows = {r["key"]: r for r in pipeline.read_rows(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == ["0", "1", "2", "9"]
    assert (rows["9"]["status"], rows["9"]["error"]) == (
        "error", "cannot open image: OSError: Truncated File Read"
    )
    for i, picture in enumerate(pictures):
        labels, _ = pipeline.decode_masks(rows[str(i)])
        expected = expected_labels(picture, ("red", "green", "blue"), background=True)
        assert np.array_equal(labels, expected)
        present = np.flatnonzero(np.bincount(expected.ravel(), minlength=4))
        assert rows[str(i)]["class_ids"] == present.tolist()
    meta = pipeline.read_run_metadata(str(tmp_path / "out"))
    assert (meta["family"], meta["method"], meta["names"]) == (
        "colour", METHOD, ["red", "green", "blue", "background"],
    )  # fmt: skip


# ----------------------------------------------------------------------------- import scan

# What pipeline/ and jobs/ may import of cliptrase: the protocol and the factory, the
# family-neutral pieces (names, errors, results, class files, metrics, bilinear taps, the
# hub's offline probe), and
# FLOSS's public API (a CLIP-family option, refused for other families).
ALLOWED = {
    "cliptrase",
    "cliptrase.protocol",
    "cliptrase.factory",
    "cliptrase.config",
    "cliptrase.errors",
    "cliptrase.result",
    "cliptrase.names",
    "cliptrase.taps",
    "cliptrase.classfile",
    "cliptrase.metrics",
    "cliptrase.floss",
    "cliptrase.hub",
}
# Names used as ``cliptrase.<name>`` after ``import cliptrase``.
ALLOWED_ATTRIBUTES = {"InvalidImageError", "CliptraseError", "VocabularyError", "__version__"}


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module imported by ``path`` (module level and inside functions), absolute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.append((base, node.lineno))
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return out


def test_pipeline_and_jobs_use_no_segmentor_family_internals():
    offenders = []
    for folder in ("pipeline", "jobs"):
        for path in sorted((ROOT / folder).glob("*.py")):
            names = {module for module, _ in _imports(path)}
            for module, line in _imports(path):
                if not module.startswith("cliptrase"):
                    continue
                parent = module.rsplit(".", 1)[0]
                if module in ALLOWED or (parent in ALLOWED and parent != "cliptrase"):
                    continue  # a module, or a name from an allowed module
                if parent == "cliptrase" and module.split(".")[1] in ALLOWED_ATTRIBUTES:
                    continue
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
            if "cliptrase" in names:
                tree = ast.parse(path.read_text())
                for node in ast.walk(tree):
                    if (
                        isinstance(node, ast.Attribute)
                        and isinstance(node.value, ast.Name)
                        and node.value.id == "cliptrase"
                        and node.attr not in ALLOWED_ATTRIBUTES
                    ):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} cliptrase.{node.attr}")
    assert offenders == []


def test_the_scan_sees_imports_inside_functions():
    source = "def f():\n    from cliptrase.segmentor import Segmentor\n"
    probe = ROOT / "pipeline" / "_probe_for_scan.py"
    try:
        probe.write_text(source)
        assert ("cliptrase.segmentor", 2) in _imports(probe)
    finally:
        probe.unlink()
