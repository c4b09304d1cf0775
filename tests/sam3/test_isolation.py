"""The SAM 3 family stands apart: no CLIP module imported (by the source, and at run time),
``import cliptrase.sam3`` is cheap, importing Meta's sam3 leaves the process's TF32 switches as
they were, and random weights are the same in every process."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

import cliptrase.sam3
from cliptrase.sam3 import build_image_model
from cliptrase.sam3.model import SIZES

PACKAGE = Path(cliptrase.sam3.__file__).parent
# What cliptrase/sam3 may import of cliptrase: the family-neutral modules (hub: offline rules).
ALLOWED = {"protocol", "result", "config", "errors", "names", "taps", "hub", "sam3"}
CLIP_MODULES = {
    "segmentor",
    "attention",
    "backbone",
    "text",
    "head",
    "refine",
    "methods",
    "weights",
    "tower",
    "floss",
}


def _imported_modules(path: Path) -> list[str]:
    """Every module a file imports, at module level or inside functions, as absolute names."""
    package = ["cliptrase", "sam3"]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                if node.module:
                    found.append(".".join(base + [node.module]))
                else:  # from .. import x
                    found += [".".join(base + [alias.name]) for alias in node.names]
            else:
                found.append(node.module)
    return found


def test_no_clip_module_is_imported_anywhere_in_the_source():
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 10
    seen = set()
    for path in files:
        for module in _imported_modules(path):
            seen.add(module)
            top = module.split(".")[0]
            assert top != "open_clip", f"{path.name} imports {module}"
            if top == "cliptrase":
                part = module.split(".")[1] if "." in module else ""
                assert part in ALLOWED, f"{path.name} imports {module}"
                assert part not in CLIP_MODULES
    # The scan sees relative imports of both levels (not vacuous).
    assert "cliptrase.errors" in seen and "cliptrase.sam3.fusion" in seen
    assert any(m.startswith("sam3.") for m in seen)


def test_the_lazy_exports_name_modules_of_the_package():
    for name, module in cliptrase.sam3._EXPORTS.items():
        assert (PACKAGE / f"{module}.py").is_file(), name


def _digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_CHILD = """
import json, sys
import cliptrase.sam3
cheap = not any(m in sys.modules for m in ("torch", "sam3"))
from cliptrase.sam3.tf32 import tf32_flags
before = tf32_flags()
from cliptrase.sam3 import load_sam3_segmentor
seg = load_sam3_segmentor("sam3-tiny", pretrained=None, device="cpu", seed=5)
after = tf32_flags()
import hashlib, torch
digest = hashlib.sha256()
for key, value in seg.model.state_dict().items():
    digest.update(key.encode())
    digest.update(value.contiguous().view(torch.uint8).numpy().tobytes())
clip = sorted(m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")
              or m.split(".")[:2] in [["cliptrase", n] for n in CLIP_NAMES])
print(json.dumps({"cheap": cheap, "before": before, "after": after, "digest": digest.hexdigest(),
                  "clip": clip, "sam3": "sam3.model.sam3_image" in sys.modules}))
""".replace("CLIP_NAMES", repr(sorted(CLIP_MODULES)))


def test_a_fresh_process_imports_no_clip_keeps_tf32_and_draws_the_same_weights():
    child = subprocess.run(
        [sys.executable, "-c", _CHILD],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(PACKAGE.parent.parent),
    )
    assert child.returncode == 0, child.stderr[-2000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["cheap"], "import cliptrase.sam3 imported torch or sam3"
    assert report["sam3"] and report["clip"] == []
    assert report["before"] == report["after"]
    assert report["digest"] == _digest(build_image_model(SIZES["tiny"], seed=5))
