"""Exactness of ``cliptrase.sam3`` against the official SegEarth-OV3 and ActiveSAM code.

    python bench/sam3_parity.py --segearth SRC/earth-insights+SegEarth-OV-3 \\
        --activesam SRC/VILA-Lab+ActiveSAM --weights /scratch/sam3_perturbed.pt --out /scratch/out

``--segearth`` / ``--activesam``: checkouts of ``earth-insights/SegEarth-OV-3`` @ 87e5cc1 and
``VILA-Lab/ActiveSAM`` @ 41cad43, each with its vendored ``sam3``. ``--weights``: a checkpoint
in Meta's layout (``{"model": {"detector.<key>": tensor}}``); when the file does not exist it
is created: the full-size SAM 3 (840.5 M parameters) with random weights from ``--seed``, its
norm layers and biases perturbed so the random model is not degenerate (``perturb``).
``--out``: scratch folder for the feature cache, the mmseg/mmengine stubs, the arrays of both
sides, ``parity.json`` and ``parity.md``. Nothing of the official code, no weights and no
output is written outside these paths.

Each side runs in its own process (``--stage``), the official ones with their repository first
on ``sys.path`` so their vendored ``sam3`` is the one imported, and with minimal stubs for the
mmseg/mmengine names they import (a registry decorator, ``BaseSegmentor`` as ``nn.Module``,
``PixelData``, ``BaseSegDataset``). Their segmentors are built by their own ``__init__``; only
the ``build_sam3_image_model`` they call is redirected to the vendored builder itself, run on
the CPU (``device="cuda"`` factory arguments become the CPU inside the build; the checkpoint is
loaded by the vendored ``_load_checkpoint``) and ``Tensor.pin_memory`` is a no-op. Their
``torch.autocast("cuda", bf16)`` is disabled on a machine without CUDA: both sides run float32
on the CPU. Their ``predict`` reads each photo from disk, as under mmseg, with ``data_samples``
carrying ``img_path`` and ``ori_shape``.

The vision backbone (~100 s per image at 1008 px on 2 cores) runs once per image, here, with
the pip ``sam3`` model (the vendored backbones are the same code; ActiveSAM's extra
``raw_trunk_features`` output is read by nothing) and its outputs are cached on disk together
with the normalised input they came from. On both sides ``model.backbone.forward_image`` is
replaced by a lookup that returns the cached outputs only for an input tensor *equal* to the
cached one, so every lookup also proves both sides fed the model identical pixels. ActiveSAM's
672 px preview features are cached too (computed under ``cliptrase``'s RoPE swap; the official
process checks its own patched RoPE tables are equal to the ones used).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import machine, photo  # noqa: E402

# ----------------------------------------------------------------------------- settings
SEED = 0
# Photos from scikit-image, downscaled (H, W) to keep the post-processing at the original size
# cheap; distinct sizes, two aspects.
IMAGES: dict[str, tuple[int, int]] = {
    "astronaut": (480, 480),
    "chelsea": (300, 451),  # native size
    "coffee": (320, 480),
}
# The class file both official segmentors read (SegEarth's format: line i is class i, aliases
# after commas; line 0 "background" = bg_idx 0). 8 classes, 10 prompts: aliases (the official
# one-hot collapse) and names ActiveSAM canonicalises (tvmonitor, pottedplant, mouse).
CLASS_LINES = [
    "background",
    "person, astronaut",
    "cat",
    "tvmonitor",
    "pottedplant",
    "mouse",
    "cup, mug",
    "grass",
]
# Thresholds chosen for the random model (the official defaults are 0.5 / 0.3 and prob_thd 0
# or 0.1-0.4): instance scores of one prompt are nearly equal (the random decoder's 200 queries
# are near-identical), so each threshold sits in a gap of the scores (>= 6e-5 from every
# score, far above float noise) where some prompts keep all 200 queries, others none, and one
# (SegEarth-OV3: coffee "astronaut") keeps 1 of 200. prob_thd sends 10-50 % of the pixels to
# the background. The same values on both sides.
SEGEARTH = {"confidence_threshold": 0.3004, "prob_thd": 0.2}
SAM3_ALONE = {"confidence_threshold": 0.3004, "prob_thd": 0.3}
ACTIVESAM = {
    "confidence_threshold": 0.194,
    "prob_thd": 0.03,  # MABC threshold 0.03 ** 1.25
    "mabc_exponent": 1.25,
    "neighbor_tokens": 2,
    "hypernym_tokens": 2,  # the official default; without nltk the official code drops them
    "bucket_size": 3,  # official 32: several buckets from 10 prompts
    "preview_resolution": 672,
    "quantile_alpha": 0.5,  # official 0.2: 5 of 10 prompts pass the quantile ...
    "pruner_max_active": 4,  # official 40: ... the preview runs, and the cap (topk) binds
}
OUR_BUCKET = 8  # ours, segearthov3/sam3: 30 (image, prompt) pairs in 4 chunks, images mixed
AGREEMENT_MIN = 0.999
SCORE_TOL = 1e-4
STAGES = ("weights", "features", "ours", "segearth", "activesam", "compare")


def classes_and_synonyms() -> tuple[list[str], list[list[str]]]:
    """Our vocabulary for CLASS_LINES: the first name of each line is the class, the others its
    synonyms (rows: the classes, then the synonyms in class order)."""
    classes, synonyms = [], []
    for line in CLASS_LINES:
        names = [n.strip() for n in line.split(",")]
        classes.append(names[0])
        synonyms.append(names[1:])
    return classes, synonyms


# ----------------------------------------------------------------------------- weights
def perturb(model: torch.nn.Module, seed: int) -> dict[str, int]:
    """Make random SAM 3 non-degenerate: every LayerNorm/GroupNorm (and sam3's LayerNorm2d)
    weight ``1 + 0.2 N(0, 1)``, every bias (norms, linears, convolutions, attention in-proj)
    ``0.2 N(0, 1)``, seeded; then two output heads get an affine rescale (:data:`HEAD_EDITS`).

    Why the heads: with random weights the presence logit is ~-1.2 for every prompt and
    image (spread ~0.1) and the semantic probability ~0.47 +- 0.03 everywhere, so presence
    would hardly vary across prompts and the semantic term (>= 0.36) would always beat the
    instance terms (<= 0.13): the instance path would never reach a label. Rescaling the
    presence logit about its mean (x10) and the semantic logit (x8, shifted to ~-1.5) gives
    both the spread of a trained model. Returns the counts."""
    generator = torch.Generator().manual_seed(seed + 1)
    counts = {"norm_weights": 0, "biases": 0}
    norms = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm | torch.nn.GroupNorm)
        or type(module).__name__ == "LayerNorm2d"
    }
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            if leaf == "weight" and owner in norms:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
                counts["norm_weights"] += 1
            elif leaf.endswith("bias") and param.ndim == 1:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
                counts["biases"] += 1
        for name, (scale, shift) in HEAD_EDITS.items():
            layer = model.get_submodule(name)
            layer.weight.mul_(scale)
            layer.bias.mul_(scale).add_(shift)
            counts[f"edited {name}"] = 1
    return counts


# logit -> scale * logit + shift on the last layer of two heads (``perturb``): the presence
# head about its random-weight mean (-1.2 -> 0), the semantic head to a spread of ~1 around
# -1.5. The vision backbone is untouched by both (its cached features stay valid).
HEAD_EDITS = {
    "transformer.decoder.presence_token_head.layers.2": (10.0, 12.0),
    "segmentation_head.semantic_seg_head": (8.0, -0.7),
}


def make_weights(path: Path, seed: int) -> dict:
    from cliptrase.sam3.model import SIZES, build_image_model

    start = time.perf_counter()
    model = build_image_model(SIZES["full"], seed=seed)
    counts = perturb(model, seed)
    state = {f"detector.{k}": v.contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": state}, tmp)
    os.replace(tmp, path)
    info = {
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensors": len(state),
        **counts,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print("weights:", info, flush=True)
    return info


# ----------------------------------------------------------------------------- photos
def photo_paths(out: Path) -> dict[str, Path]:
    """The photos as PNG files (the official ``predict`` reads its image from disk)."""
    from PIL import Image

    folder = out / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (h, w) in IMAGES.items():
        path = folder / f"{name}.png"
        if not path.exists():
            image = photo(name)
            if image.size != (w, h):
                image = image.resize((w, h), Image.BILINEAR)
            image.save(path)
        paths[name] = path
    return paths


def load_photo(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


# ----------------------------------------------------------------------------- feature cache
def cache_path(out: Path, name: str, side: int) -> Path:
    return out / "features" / f"{name}_{side}.pt"


class FeatureCache:
    """``model.backbone.forward_image`` replaced by a lookup of cached outputs, per batch row,
    for inputs equal to the cached input tensors (anything else: an error)."""

    def __init__(self, out: Path):
        self.entries = []
        for path in sorted((out / "features").glob("*.pt")):
            entry = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            entry["name"] = path.stem
            self.entries.append(entry)
        if not self.entries:
            raise FileNotFoundError(
                f"no cached features in {out / 'features'}: run --stage features"
            )
        self.served: list[str] = []

    def lookup(self, pixels: torch.Tensor) -> dict:
        rows = []
        for row in pixels:
            match = [
                e
                for e in self.entries
                if e["input"].shape[-1] == row.shape[-1] and torch.equal(e["input"][0], row)
            ]
            if not match:
                raise AssertionError(
                    f"forward_image got a {tuple(row.shape)} input equal to no cached input: "
                    "the two sides' preprocessing differs"
                )
            rows.append(match[0])
            self.served.append(match[0]["name"])

        def cat(key, level=None):
            parts = [e[key] if level is None else e[key][level] for e in rows]
            return torch.cat(parts, 0).clone()

        levels = len(rows[0]["backbone_fpn"])
        return {
            "vision_features": cat("vision_features"),
            "vision_pos_enc": [cat("vision_pos_enc", i) for i in range(levels)],
            "backbone_fpn": [cat("backbone_fpn", i) for i in range(levels)],
            "sam2_backbone_out": None,
        }

    def install(self, model: torch.nn.Module) -> None:
        """Replace ``model``'s ``forward_image``; the cache must come from its vision weights."""
        mine = backbone_fingerprint(model)
        for entry in self.entries:
            if not torch.equal(entry["fingerprint"], mine):
                raise AssertionError(f"{entry['name']} was computed with other vision weights")
        model.backbone.forward_image = self.lookup


def backbone_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Sum and sum of squares (float64) of the vision backbone's parameters."""
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for param in model.backbone.vision_backbone.parameters():
            p = param.detach().double()
            total += torch.stack([p.sum(), (p * p).sum()])
    return total


def stage_features(args) -> None:
    """Each photo's vision-backbone outputs at 1008 px (and ActiveSAM's 672 px preview), from
    the pip model, with the normalised input; both processors' transforms checked equal to
    ours first."""
    from sam3.model.sam3_image_processor import Sam3Processor
    from torchvision.transforms import v2

    from cliptrase.sam3 import load_sam3_segmentor
    from cliptrase.sam3.preview import _global_blocks, rope_table, vit_rope_for_grid

    seg = load_sam3_segmentor("sam3", pretrained=str(args.weights), device="cpu")
    active = seg.variant(method="activesam")
    model = seg.model
    (args.out / "features").mkdir(parents=True, exist_ok=True)
    info = {}
    for name, path in photo_paths(args.out).items():
        photo = load_photo(path)
        prepared = active.prepare(photo)
        for side in (1008, active.preview_side):
            target = cache_path(args.out, name, side)
            if target.exists():
                continue
            official = Sam3Processor(model, resolution=side, device="cpu").transform(
                v2.functional.to_image(photo)
            )[None]
            ours = seg._pixels([prepared.pixels if side == 1008 else prepared.preview])
            assert torch.equal(official, ours), f"{name} {side}: the transforms differ"
            start = time.perf_counter()
            with torch.inference_mode():
                if side == 1008:
                    out = model.backbone.forward_image(ours)
                    tables = {}
                else:
                    grid = side // seg.size.patch
                    with vit_rope_for_grid(model.backbone.vision_backbone.trunk, grid):
                        out = model.backbone.forward_image(ours)
                    tables = {
                        f"rope_{i}": rope_table(attn, grid)
                        for i, attn in enumerate(
                            _global_blocks(model.backbone.vision_backbone.trunk)
                        )
                    }
            seconds = time.perf_counter() - start
            entry = {
                "input": ours.contiguous(),
                "vision_features": out["vision_features"].contiguous(),
                "vision_pos_enc": [x.contiguous() for x in out["vision_pos_enc"]],
                "backbone_fpn": [x.contiguous() for x in out["backbone_fpn"]],
                "fingerprint": backbone_fingerprint(model),
                **tables,
            }
            torch.save(entry, target)
            info[f"{name}_{side}"] = round(seconds, 1)
            print(f"features {name} {side}px: {seconds:.1f} s", flush=True)
    if info:
        _merge_json(args.out / "stage_features.json", {"backbone_seconds": info})


# ----------------------------------------------------------------------------- our side
def _our_methods():
    from cliptrase.sam3 import METHODS

    seg3 = METHODS["segearthov3"].with_options(bucket_size=OUR_BUCKET, **SEGEARTH)
    sam3 = METHODS["sam3"].with_options(bucket_size=OUR_BUCKET, **SAM3_ALONE)
    active = METHODS["activesam"].with_options(
        confidence_threshold=ACTIVESAM["confidence_threshold"],
        prob_thd=ACTIVESAM["prob_thd"],
        mabc_exponent=ACTIVESAM["mabc_exponent"],
        neighbour_tokens=ACTIVESAM["neighbor_tokens"],
        hypernym_tokens=0,  # = the official run without nltk
        bucket_size=ACTIVESAM["bucket_size"],
        quantile_alpha=ACTIVESAM["quantile_alpha"],
        max_active=ACTIVESAM["pruner_max_active"],
    )
    return {"segearthov3": seg3, "sam3": sam3, "activesam": active}


@contextlib.contextmanager
def negative_control(kind: str):
    """Deliberately wrong fusions that the comparison must reject.

    * ``presence_once``: instance terms ``sigmoid(m) * sigmoid(logit)`` (the presence factor
      left out of the instance score, so it enters once instead of twice);
    * ``sigmoid_then_resize``: masks and semantic maps resized *after* the sigmoid.
    """
    import torch.nn.functional as F

    import cliptrase.sam3.fusion as fusion
    import cliptrase.sam3.segmentor as segmod

    saved_fused, saved_resized = segmod.fused_prompt_scores, fusion.resized_probabilities
    if kind == "presence_once":

        def fused(masks, semantic, scores, keep, presence, size, **kw):
            return saved_fused(
                masks, semantic, scores / presence[:, None], keep, presence, size, **kw
            )

        segmod.fused_prompt_scores = fused
    elif kind == "sigmoid_then_resize":

        def resized(logits, size):
            return F.interpolate(logits.sigmoid(), size=size, mode="bilinear", align_corners=False)

        fusion.resized_probabilities = resized
    else:
        raise ValueError(kind)
    try:
        yield
    finally:
        segmod.fused_prompt_scores, fusion.resized_probabilities = saved_fused, saved_resized


class OurRecorder:
    """What our segmentor did, read through wrappers around its module-level calls: per
    (image, row) the presence and the kept-instance count, the preview presences and choices,
    and each label's fused score map (the max over its prompts' maps, which the accumulator
    absorbs)."""

    def __init__(self, num_labels: int):
        import cliptrase.sam3.fusion as fusion
        import cliptrase.sam3.segmentor as segmod

        self.num_labels = num_labels
        self.sizes = {v: k for k, v in IMAGES.items()}
        self.reset()
        recorder = self
        orig_ground, orig_absorb = segmod.ground, segmod.Sam3Segmentor._absorb
        orig_active, orig_acc_absorb = segmod.active_prompts, fusion.LabelAccumulator.absorb

        def ground(model, backbone_out, img_ids, text_ids, text, *options):
            recorder.last_rows = text_ids.tolist()
            recorder.groundings.append(len(recorder.last_rows))
            return orig_ground(model, backbone_out, img_ids, text_ids, text, *options)

        def absorb_chunk(self, accumulator, out, scores, keep, presence, positions, labels, size):
            image = recorder.sizes[tuple(size)]
            for i in positions:
                row = recorder.last_rows[i]
                recorder.pairs.setdefault(image, {})[row] = {
                    "presence": float(presence[i]),
                    "kept": int(keep[i].sum()),
                }
            return orig_absorb(
                self, accumulator, out, scores, keep, presence, positions, labels, size
            )

        def absorb_maps(self, prompt_scores, labels):
            image = recorder.sizes[tuple(prompt_scores.shape[-2:])]
            maps = recorder.scores.setdefault(
                image, torch.zeros((recorder.num_labels, *prompt_scores.shape[-2:]))
            )
            for scores, label in zip(prompt_scores, labels):
                maps[label] = torch.maximum(maps[label], scores.float())
            return orig_acc_absorb(self, prompt_scores, labels)

        def active_prompts(presence, alpha, max_active):
            chosen = orig_active(presence, alpha, max_active)
            recorder.previews.append(
                {"presence": presence.float().tolist(), "active": chosen.tolist()}
            )
            return chosen

        segmod.ground, segmod.Sam3Segmentor._absorb = ground, absorb_chunk
        segmod.active_prompts, fusion.LabelAccumulator.absorb = active_prompts, absorb_maps

    def reset(self):
        self.last_rows: list[int] = []
        self.groundings: list[int] = []
        self.pairs: dict[str, dict[int, dict]] = {}
        self.scores: dict[str, torch.Tensor] = {}
        self.previews: list[dict] = []


def stage_ours(args) -> None:
    from cliptrase.sam3 import load_sam3_segmentor

    torch.manual_seed(SEED)
    seg = load_sam3_segmentor("sam3", pretrained=str(args.weights), device="cpu")
    cache = FeatureCache(args.out)
    cache.install(seg.model)
    classes, synonyms = classes_and_synonyms()
    paths = photo_paths(args.out)
    photos = {name: load_photo(path) for name, path in paths.items()}
    recorder = OurRecorder(len(classes))
    runs = [(name, method, None) for name, method in _our_methods().items()]
    runs += [
        ("segearthov3", _our_methods()["segearthov3"], control)
        for control in ("presence_once", "sigmoid_then_resize")
    ]
    summary = {}
    (args.out / "arrays").mkdir(parents=True, exist_ok=True)
    _merge_json(args.out / "stage_ours.json", {"_code": code_version()})
    for name, method, control in runs:
        label = name if control is None else f"{name}+{control}"
        variant = seg.variant(method=method)
        vocab = variant.vocabulary(classes, synonyms=synonyms)
        assert vocab.background_label == 0
        recorder.reset()
        cache.served.clear()
        start = time.perf_counter()
        with negative_control(control) if control else contextlib.nullcontext():
            results = variant.segment_batch([variant.prepare(p) for p in photos.values()], vocab)
        seconds = time.perf_counter() - start
        stats = variant.last_run
        per_image = {}
        for (image, _), result in zip(photos.items(), results):
            scores = recorder.scores[image].numpy()
            np.savez_compressed(
                args.out / "arrays" / f"ours_{label}_{image}.npz",
                labels=result.labels.astype(np.int64),
                scores=scores,
            )
            recomputed = scores.argmax(0)
            per_image[image] = {
                "pairs": {vocab.prompts[r]: v for r, v in sorted(recorder.pairs[image].items())},
                "labels_present": sorted(int(x) for x in np.unique(result.labels)),
                "background_pixels": float(np.mean(result.labels == 0)),
                "argmax_differs_from_labels": float(np.mean(recomputed != result.labels)),
            }
        previews = [
            {
                "presence": p["presence"],
                "active": [vocab.prompts[r] for r in p["active"]],
            }
            for p in recorder.previews
        ]
        summary[label] = {
            "method": {k: getattr(method, k) for k in method.__dataclass_fields__},
            "texts": list(vocab.texts),
            "groundings": recorder.groundings,
            "kept_instances": stats.kept_instances,
            "pairs_decoded": stats.pairs,
            "previews": previews,
            "inputs_served": sorted(set(cache.served)),
            "images": per_image,
            "seconds": round(seconds, 1),
        }
        print(f"ours {label}: {seconds:.0f} s, kept {stats.kept_instances}", flush=True)
        _merge_json(args.out / "stage_ours.json", {label: summary[label]})


# ----------------------------------------------------------------------------- official side
STUBS = {
    "mmseg/__init__.py": "",
    "mmseg/registry.py": (
        "class Registry:\n"
        "    def __init__(self, name):\n"
        "        self.name, self.modules = name, {}\n"
        "    def register_module(self, name=None, force=False, module=None):\n"
        "        def register(cls):\n"
        "            self.modules[name or cls.__name__] = cls\n"
        "            return cls\n"
        "        return register if module is None else register(module)\n"
        "MODELS = Registry('models')\n"
        "DATASETS = Registry('datasets')\n"
    ),
    "mmseg/models/__init__.py": "",
    "mmseg/models/builder.py": "from mmseg.registry import MODELS\n",
    "mmseg/models/segmentors/__init__.py": (
        "from torch import nn\n"
        "class BaseSegmentor(nn.Module):\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        super().__init__()\n"
    ),
    "mmseg/models/data_preprocessor.py": "class SegDataPreProcessor:\n    pass\n",
    "mmseg/datasets/__init__.py": (
        "class BaseSegDataset:\n    def __init__(self, *args, **kwargs):\n        pass\n"
    ),
    "mmengine/__init__.py": "",
    "mmengine/fileio.py": "import os\ndef exists(path, backend_args=None):\n    return os.path.exists(path)\n",
    "mmengine/structures.py": (
        "class PixelData:\n"
        "    def __init__(self, **kwargs):\n"
        "        for k, v in kwargs.items():\n"
        "            setattr(self, k, v)\n"
    ),
}


def write_stubs(out: Path) -> Path:
    root = out / "stubs"
    for rel, text in STUBS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


class DataSample:
    """What mmseg hands ``predict``: ``metainfo`` and ``set_data``."""

    def __init__(self, img_path: str, ori_shape: tuple[int, int]):
        self.metainfo = {"img_path": img_path, "ori_shape": ori_shape}
        self.data = {}

    def set_data(self, data: dict) -> None:
        self.data.update(data)


def official_imports(repo: Path, out: Path):
    """Put the stubs and the official repository first on sys.path; no pin_memory on CPU."""
    sys.path[:0] = [str(write_stubs(out)), str(repo)]
    torch.Tensor.pin_memory = lambda self, *a, **k: self  # geometry_encoders.py:658-659


def cpu_builder(repo: Path, weights: Path, record: dict):
    """The vendored ``build_sam3_image_model``, run on the CPU with our checkpoint; one model
    per process (memoised)."""
    import sam3
    from sam3.model_builder import build_sam3_image_model
    from torch.overrides import TorchFunctionMode

    assert Path(sam3.__file__).resolve().is_relative_to(repo.resolve()), sam3.__file__

    class CudaToCpu(TorchFunctionMode):
        # position_encoding.py:47 and decoder.py:279-282 allocate on "cuda" at construction.
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    built = {}

    def build(*_, **kwargs):
        if "model" not in built:
            start = time.perf_counter()
            with CudaToCpu():
                model = build_sam3_image_model(
                    bpe_path=str(repo / "sam3" / "assets" / "bpe_simple_vocab_16e6.txt.gz"),
                    device="cpu",
                    checkpoint_path=str(weights),
                    load_from_HF=False,
                )
            state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)["model"]
            keys = {k.removeprefix("detector.") for k in state}
            expected = set(model.state_dict())
            record["checkpoint_keys"] = {
                "model": len(expected),
                "checkpoint": len(keys),
                "missing": sorted(expected - keys),
                "unexpected": sorted(keys - expected),
            }
            mismatched = [
                k
                for k, v in model.state_dict().items()
                if not torch.equal(v, state["detector." + k])
            ]
            record["checkpoint_keys"]["not_loaded"] = mismatched
            record["build_seconds"] = round(time.perf_counter() - start, 1)
            record["requested"] = {k: str(v) for k, v in kwargs.items()}
            built["model"] = model
        return built["model"]

    return build


def class_file(out: Path) -> Path:
    path = out / "classes.txt"
    path.write_text("\n".join(CLASS_LINES))  # no trailing newline, as the official files
    return path


def _official_predict(
    segmentor, paths: dict[str, Path]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    samples = [DataSample(str(path), IMAGES[name]) for name, path in paths.items()]
    segmentor.predict(None, samples)
    return {
        name: (
            s.data["pred_sem_seg"].data[0].cpu().numpy().astype(np.int64),
            s.data["seg_logits"].data.float().cpu().numpy(),
        )
        for name, s in zip(paths, samples)
    }


def stage_segearth(args) -> None:
    official_imports(args.segearth, args.out)
    import segearthov3_segmentor as official

    record: dict = {}
    official.build_sam3_image_model = cpu_builder(args.segearth, args.weights, record)
    cache = FeatureCache(args.out)
    paths = photo_paths(args.out)
    summary = {}
    for label, settings, switches in (
        ("segearthov3", SEGEARTH, {}),
        ("sam3", SAM3_ALONE, {"use_sem_seg": False, "use_presence_score": False}),
    ):
        seg = official.SegEarthOV3Segmentation(
            classname_path=str(class_file(args.out)),
            device=torch.device("cpu"),
            bg_idx=0,
            **settings,
            **switches,
        )
        cache.install(seg.processor.model)
        cache.served.clear()
        calls = []
        forward = seg.processor._forward_grounding

        def grounding(state, forward=forward, calls=calls):
            state = forward(state)
            calls.append(
                {
                    "prompt": state["backbone_out"]["language_features"].shape,
                    "presence": float(state["presence_score"]),
                    "kept": int(state["masks_logits"].shape[0]),
                }
            )
            return state

        seg.processor._forward_grounding = grounding
        start = time.perf_counter()
        outputs = _official_predict(seg, paths)
        seconds = time.perf_counter() - start
        images = {}
        for i, (name, (labels, scores)) in enumerate(outputs.items()):
            np.savez_compressed(
                args.out / "arrays" / f"official_{label}_{name}.npz", labels=labels, scores=scores
            )
            mine = calls[i * seg.num_queries : (i + 1) * seg.num_queries]
            images[name] = {
                "pairs": {
                    w: {"presence": c["presence"], "kept": c["kept"]}
                    for w, c in zip(seg.query_words, mine)
                },
                "labels_present": sorted(int(x) for x in np.unique(labels)),
                "background_pixels": float(np.mean(labels == 0)),
            }
        summary[label] = {
            "settings": {**settings, **switches, "bg_idx": 0},
            "query_words": seg.query_words,
            "groundings": len(calls),
            "kept_instances": sum(c["kept"] for c in calls),
            "inputs_served": sorted(set(cache.served)),
            "images": images,
            "seconds": round(seconds, 1),
        }
        print(f"official SegEarth-OV3 {label}: {seconds:.0f} s", flush=True)
    summary["_process"] = {**record, "autocast_enabled_on_cpu": _autocast_cuda_enabled()}
    _merge_json(args.out / "stage_segearth.json", summary)


def _autocast_cuda_enabled() -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            return torch.is_autocast_enabled("cuda")


def stage_activesam(args) -> None:
    official_imports(args.activesam, args.out)
    try:
        import nltk  # noqa: F401

        raise SystemExit("nltk is installed: the official run would add WordNet hypernym tokens")
    except ImportError:
        pass
    import activesam
    from activesam.model import base

    record: dict = {}
    base.build_sam3_image_model = cpu_builder(args.activesam, args.weights, record)
    seg = activesam.ActiveSAM(
        classname_path=str(class_file(args.out)),
        device=torch.device("cpu"),
        bg_idx=0,
        **ACTIVESAM,
    )
    model = seg.processor.model
    cache = FeatureCache(args.out)
    cache.install(model)
    paths = photo_paths(args.out)

    # The official RoPE patch's tables: 48x48 (the preview) equal to those the cached
    # preview features were computed with; 72x72 equal to the checkpoint's buffers.
    rope = _check_official_rope(model, cache)

    buckets, previews, preview_buckets = [], [], []
    full = seg.processor.set_text_prompts_batch
    preview = seg.pruner._preview_processor.set_text_prompts_batch
    decide = seg.pruner._decide_active

    def full_batch(prompts, state, **kw):
        per = full(prompts, state, **kw)
        buckets.append(
            {
                "classes": kw.get("bucket_class_slots"),
                "tokens": int(state["backbone_out"]["language_features"].shape[0]),
                "presence": [float(p["presence_score"]) for p in per],
                "kept": [int(p["masks_logits"].shape[0]) for p in per],
            }
        )
        return per

    def preview_batch(prompts, state, **kw):
        preview_buckets.append(len(prompts))
        return preview(prompts, state, **kw)

    def decide_active(scores):
        active = decide(scores)
        previews.append({"presence": scores.float().tolist(), "active": active})
        return active

    seg.processor.set_text_prompts_batch = full_batch
    seg.pruner._preview_processor.set_text_prompts_batch = preview_batch
    seg.pruner._decide_active = decide_active
    start = time.perf_counter()
    outputs = _official_predict(seg, paths)
    seconds = time.perf_counter() - start
    images = {}
    per_image = len(buckets) // len(paths)
    for i, (name, (labels, scores)) in enumerate(outputs.items()):
        np.savez_compressed(
            args.out / "arrays" / f"official_activesam_{name}.npz", labels=labels, scores=scores
        )
        pairs = {}
        for bucket in buckets[i * per_image : (i + 1) * per_image]:
            for c, p, k in zip(bucket["classes"], bucket["presence"], bucket["kept"]):
                pairs[seg.query_words[c]] = {"presence": p, "kept": k}
        images[name] = {
            "pairs": pairs,
            "labels_present": sorted(int(x) for x in np.unique(labels)),
            "background_pixels": float(np.mean(labels == 0)),
        }
    hypernyms = seg.memory_bank.banks[1]
    summary = {
        "activesam": {
            "settings": {**ACTIVESAM, "bg_idx": 0},
            "query_words": seg.query_words,
            "encoded_texts": list(model.backbone._prompt_text_cache),
            "nltk_installed": False,
            "hypernym_tokens_built": int(hypernyms._tokens.numel()),
            "skip_seg_head_in_preview": bool(seg.enable_skip_seg_head),
            "buckets": buckets,
            "preview_buckets": preview_buckets,
            "previews": [
                {"presence": p["presence"], "active": [seg.query_words[c] for c in p["active"]]}
                for p in previews
            ],
            "kept_instances": sum(sum(b["kept"]) for b in buckets),
            "inputs_served": sorted(set(cache.served)),
            "images": images,
            "seconds": round(seconds, 1),
        },
        "_process": {
            **record,
            "rope": rope,
            "autocast_enabled_on_cpu": _autocast_cuda_enabled(),
        },
    }
    print(f"official ActiveSAM: {seconds:.0f} s", flush=True)
    _merge_json(args.out / "stage_activesam.json", summary)


def _check_official_rope(model, cache: FeatureCache) -> dict:
    """Run the official dynamic-RoPE ``_apply_rope`` (installed by ActiveSAM's pruner) on
    dummy queries of a 48x48 and a 72x72 grid in every global block, and compare the tables
    it computes with the ones our cached preview features used / the checkpoint's."""
    trunk = model.backbone.vision_backbone.trunk
    blocks = [b.attn for b in trunk.blocks if b.window_size == 0 and b.attn.use_rope]
    preview = next(e for e in cache.entries if e["input"].shape[-1] == 672)
    original = [attn.freqs_cis.clone() for attn in blocks]
    result = {"blocks": len(blocks), "preview_equal": [], "full_equal": []}
    for i, attn in enumerate(blocks):
        for side, key in ((48, "preview_equal"), (72, "full_equal")):
            q = torch.zeros(1, attn.num_heads, side * side, attn.head_dim)
            attn._apply_rope(q, q.clone())
            expected = preview[f"rope_{i}"] if side == 48 else original[i]
            result[key].append(bool(torch.equal(attn.freqs_cis, expected)))
    return result


# ----------------------------------------------------------------------------- comparison
def code_version() -> dict:
    """The commit of this checkout and whether ``cliptrase/sam3`` differs from it."""
    root = HERE.parent

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "cliptrase_sam3_modified": bool(git("status", "--porcelain", "cliptrase/sam3")),
    }


def _merge_json(path: Path, data: dict) -> None:
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(data)
    path.write_text(json.dumps(old, indent=1, default=str))


def _arrays(out: Path, side: str, label: str, image: str):
    with np.load(out / "arrays" / f"{side}_{label}_{image}.npz") as f:
        return f["labels"], f["scores"]


def stage_compare(args) -> dict:
    out = args.out
    ours = json.loads((out / "stage_ours.json").read_text())
    code = ours.pop("_code", None)
    official = {
        **json.loads((out / "stage_segearth.json").read_text()),
        **json.loads((out / "stage_activesam.json").read_text()),
    }
    rows = []
    comparisons = [
        ("segearthov3", "segearthov3", "official SegEarth-OV3", True),
        ("activesam", "activesam", "official ActiveSAM", True),
        ("sam3", "sam3", "SegEarth-OV3 loop, use_sem_seg=False, use_presence_score=False", True),
        ("segearthov3+presence_once", "segearthov3", "official SegEarth-OV3", False),
        ("segearthov3+sigmoid_then_resize", "segearthov3", "official SegEarth-OV3", False),
    ]
    for ours_label, official_label, against, should_pass in comparisons:
        for image in IMAGES:
            a_labels, a_scores = _arrays(out, "ours", ours_label, image)
            b_labels, b_scores = _arrays(out, "official", official_label, image)
            assert a_scores.shape == b_scores.shape, (a_scores.shape, b_scores.shape)
            agreement = float(np.mean(a_labels == b_labels))
            diff = float(np.abs(a_scores - b_scores).max())
            ok = agreement >= AGREEMENT_MIN and diff <= SCORE_TOL
            o_img = ours[ours_label]["images"][image]
            f_img = official[official_label]["images"][image]
            rows.append(
                {
                    "ours": ours_label,
                    "against": against,
                    "image": image,
                    "size": IMAGES[image],
                    "agreement": agreement,
                    "max_score_diff": diff,
                    "score_range": [float(b_scores.min()), float(b_scores.max())],
                    "within_tolerance": ok,
                    "expected": "pass" if should_pass else "fail",
                    "as_expected": ok == should_pass,
                    "kept_ours": sum(v["kept"] for v in o_img["pairs"].values()),
                    "kept_official": sum(v["kept"] for v in f_img["pairs"].values()),
                    "presence_ours": _spread([v["presence"] for v in o_img["pairs"].values()]),
                    "presence_official": _spread([v["presence"] for v in f_img["pairs"].values()]),
                    "background_ours": o_img["background_pixels"],
                    "background_official": f_img["background_pixels"],
                    "labels_present": f_img["labels_present"],
                }
            )
    # Per-prompt presence and kept counts, matched by prompt.
    prompt_checks = {}
    for label in ("segearthov3", "activesam", "sam3"):
        worst_presence, kept_equal, n = 0.0, True, 0
        for image in IMAGES:
            mine = ours[label]["images"][image]["pairs"]
            theirs = official[label]["images"][image]["pairs"]
            assert set(mine) == set(theirs), (label, image, sorted(mine), sorted(theirs))
            for prompt in theirs:
                worst_presence = max(
                    worst_presence, abs(mine[prompt]["presence"] - theirs[prompt]["presence"])
                )
                kept_equal &= mine[prompt]["kept"] == theirs[prompt]["kept"]
                n += 1
        prompt_checks[label] = {
            "pairs": n,
            "max_presence_diff": worst_presence,
            "kept_counts_equal": kept_equal,
        }
    ours_previews = ours["activesam"]["previews"]
    official_previews = official["activesam"]["previews"]
    preview_checks = {
        "images": len(official_previews),
        "active_sets_equal": [
            sorted(a["active"]) == sorted(b["active"])
            for a, b in zip(ours_previews, official_previews)
        ],
        "active_sets": {image: b["active"] for image, b in zip(IMAGES, official_previews)},
        "max_preview_presence_diff": max(
            _max_diff_by_prompt(a, b, ours["activesam"]["texts"], official["activesam"])
            for a, b in zip(ours_previews, official_previews)
        ),
        "official_preview_buckets": official["activesam"]["preview_buckets"],
        "official_full_buckets": [len(b["classes"]) for b in official["activesam"]["buckets"]],
        "our_groundings": ours["activesam"]["groundings"],
    }
    texts = {
        "ours": ours["activesam"]["texts"],
        "official_encoded": official["activesam"]["encoded_texts"],
    }
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(torch_threads=torch.get_num_threads(), gpu="none"),
        "code": code,
        "settings": {
            "images": IMAGES,
            "class_lines": CLASS_LINES,
            "segearthov3": SEGEARTH,
            "sam3": SAM3_ALONE,
            "activesam": ACTIVESAM,
            "our_bucket_size": OUR_BUCKET,
            "agreement_min": AGREEMENT_MIN,
            "score_tol": SCORE_TOL,
        },
        "rows": rows,
        "prompt_checks": prompt_checks,
        "preview_checks": preview_checks,
        "texts": texts,
        "official_processes": {
            "segearth": json.loads((out / "stage_segearth.json").read_text())["_process"],
            "activesam": json.loads((out / "stage_activesam.json").read_text())["_process"],
        },
        "inputs_served": {
            "ours": {k: v["inputs_served"] for k, v in ours.items()},
            "official": {
                k: v.get("inputs_served") for k, v in official.items() if not k.startswith("_")
            },
        },
        "hypernyms": {
            "nltk_installed": official["activesam"]["nltk_installed"],
            "official_hypernym_tokens_built": official["activesam"]["hypernym_tokens_built"],
            "ours_hypernym_tokens": ours["activesam"]["method"]["hypernym_tokens"],
        },
        "all_as_expected": all(r["as_expected"] for r in rows),
    }
    (out / "parity.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "parity.md").write_text(markdown(result))
    print(markdown(result))
    return result


def _spread(values: list[float]) -> list[float]:
    return [round(min(values), 4), round(max(values), 4)] if values else []


def _max_diff_by_prompt(ours: dict, theirs: dict, our_texts, official) -> float:
    # Our preview presences are per row (classes, then synonyms); the official per query word
    # (class-file order). Match them through the prompt strings.
    classes, synonyms = classes_and_synonyms()
    rows = classes + [s for extra in synonyms for s in extra]
    mine = dict(zip(rows, ours["presence"]))
    words = official["query_words"]
    return max(abs(mine[w] - p) for w, p in zip(words, theirs["presence"]))


def markdown(result: dict) -> str:
    lines = [
        f"SAM 3 parity, {result['date']}, {result['machine']['cpus']} CPU cores, float32, "
        "full-size SAM 3 with perturbed random weights",
        "",
        "| ours | against | image | pixels agreeing | max fused-score diff | kept (ours/official)"
        " | presence range | background px | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        verdict = ("within tolerance" if r["within_tolerance"] else "OUTSIDE tolerance") + (
            "" if r["as_expected"] else " (UNEXPECTED)"
        )
        lines.append(
            f"| {r['ours']} | {r['against']} | {r['image']} {r['size'][0]}x{r['size'][1]} "
            f"| {100 * r['agreement']:.4f} % | {r['max_score_diff']:.2e} "
            f"| {r['kept_ours']}/{r['kept_official']} "
            f"| {r['presence_official'][0]:.3f}-{r['presence_official'][1]:.3f} "
            f"| {100 * r['background_official']:.1f} % | {verdict} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- driver
def add_official_args(parser: argparse.ArgumentParser) -> None:
    """The official checkouts, the checkpoint and the scratch folder (also bench/sam3_speed.py)."""
    parser.add_argument("--segearth", type=Path, required=True, help="SegEarth-OV-3 @ 87e5cc1")
    parser.add_argument("--activesam", type=Path, required=True, help="ActiveSAM @ 41cad43")
    parser.add_argument("--weights", type=Path, required=True, help="made if it does not exist")
    parser.add_argument("--out", type=Path, required=True, help="scratch folder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_official_args(parser)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arrays").mkdir(exist_ok=True)
    if args.stage == "all":
        for stage in STAGES:
            if stage == "weights" and args.weights.exists():
                continue
            print(f"--- stage {stage}", flush=True)
            command = [sys.executable, __file__, *sys.argv[1:], "--stage", stage]
            subprocess.run(command, check=True)
        return
    if args.stage == "weights":
        if not args.weights.exists():
            _merge_json(args.out / "stage_weights.json", make_weights(args.weights, args.seed))
        return
    {
        "features": stage_features,
        "ours": stage_ours,
        "segearth": stage_segearth,
        "activesam": stage_activesam,
        "compare": stage_compare,
    }[args.stage](args)


if __name__ == "__main__":
    main()
