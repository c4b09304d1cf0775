"""Speed of ``cliptrase.sam3`` against the official SegEarth-OV3 and ActiveSAM loops, one run.

    python bench/sam3_speed.py --segearth SRC/earth-insights+SegEarth-OV-3 \\
        --activesam SRC/VILA-Lab+ActiveSAM --weights /scratch/sam3_perturbed.pt \\
        --out /scratch/out

Same checkpoint, photo, feature cache, stubs and official-code harness as
``bench/sam3_parity.py`` (run that first, or pass the same ``--out``: the weights and the
cached backbone outputs are made there). Full-size SAM 3, float32 on the CPU, random weights
(timings do not depend on the weights' values, except through how many instances pass the
threshold, which is the same on both sides). One photo: astronaut at 480x480.

* (a) the whole image, 20 classes (ADE20K's first 20 names): ours (``segearthov3``,
  vocabulary compiled once, timed apart) against the official SegEarth-OV3 ``predict``
  (``_inference_single_view``: one prompt per forward, text re-encoded per prompt);
* (b) the stage after the vision backbone (its outputs cached and identical for both: the
  official processors' ``forward_image`` returns them): 20 and 150 classes (ADE20K), ours
  against the official SegEarth-OV3, and ours (``activesam``) against the official ActiveSAM;
* (c) our cost per image against the vocabulary size (1, 20, 150 prompts).

Both sides use the official ADE20K settings (SegEarth-OV3: confidence 0.3, prob_thd 0;
ActiveSAM: its defaults, preview above 40 prompts; no nltk, so no hypernym tokens on either
side). Prompts per grounding forward: ``activesam`` and the official ActiveSAM ``BUCKET`` = 16
(official default 32, halved for memory); ``segearthov3`` 1, as the official loop, and 16 (the
``_k16`` rows: in buckets the DETR encoder's first self-attention runs once per image).
Labels of every paired run are compared (agreement >= 99.9 % is asserted). ``--only`` measures
some rows of the table (by our run's key) and the official runs they need, nothing else.
Where our time goes after the backbone is read from wrappers around the model's stages (the
same wrappers on both sides): text encoder, prompt + geometry encoder, DETR encoder, decoder,
segmentation head (of which the pixel decoder), preview; the rest is post-processing.
``--official-prompts N`` times the official SegEarth-OV3 loop at 150 classes on its first N
prompts only and extrapolates linearly (its loop is one forward per prompt).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Idle OpenMP threads wait passively: on 2 cores shared with other work, spinning threads
# would inflate both wall and CPU time unevenly (as bench/pipeline.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _parity_module():
    spec = importlib.util.spec_from_file_location("sam3_parity", HERE / "sam3_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parity = _parity_module()

IMAGE = "astronaut"  # 480 x 480 (sam3_parity.IMAGES)
SIZES = (1, 20, 150)
AGREEMENT_MIN = 0.999
# Prompts per grounding forward, ours (both methods) and the official ActiveSAM's buckets
# (official default 32): at 32 the segmentation head's float32 maps of one forward need
# ~15 GB, too much next to other work on a 24 GB machine. Batching changes no output.
BUCKET = 16
STAGES = ("ours", "segearth", "activesam20", "activesam150", "report")
# Our runs: key -> (method, prompts, prompts per grounding forward). "a_" runs the real
# backbone (first, in a fresh process); "b_" runs after it, on the cached outputs.
OURS_RUNS = {
    "a_segearthov3_20": ("segearthov3", 20, 1),
    "b_segearthov3_1": ("segearthov3", 1, 1),
    "b_segearthov3_20": ("segearthov3", 20, 1),
    "b_segearthov3_20_k16": ("segearthov3", 20, BUCKET),
    "b_activesam_20": ("activesam", 20, BUCKET),
    "b_activesam_150": ("activesam", 150, BUCKET),
    "b_segearthov3_150": ("segearthov3", 150, 1),
    "b_segearthov3_150_k16": ("segearthov3", 150, BUCKET),
}
# The table's rows: (what, prompts, our run, official side, its run); each side's labels are
# saved as "<side>_<run>". An official SegEarth-OV3 loop gives both bucket sizes' baseline.
PAIRS = [
    ("(a) whole image", 20, "a_segearthov3_20", "segearth", "a_20"),
    ("(b) after backbone", 20, "b_segearthov3_20", "segearth", "b_20"),
    ("(b) after backbone", 150, "b_segearthov3_150", "segearth", "b_150"),
    ("(b) after backbone, buckets of 16", 20, "b_segearthov3_20_k16", "segearth", "b_20"),
    ("(b) after backbone, buckets of 16", 150, "b_segearthov3_150_k16", "segearth", "b_150"),
    ("(b) after backbone", 20, "b_activesam_20", "activesam", "b_20"),
    ("(b) after backbone", 150, "b_activesam_150", "activesam", "b_150"),
]


def planned(args) -> tuple[list[str], dict[str, set[str]]]:
    """Our runs and each official side's runs that ``--only`` (rows of the table, by our
    run's key) asks for; without it, every run, the vocabulary-size ones included."""
    rows = PAIRS
    if args.only:
        unknown = set(args.only) - {p[2] for p in PAIRS}
        if unknown:
            raise SystemExit(
                f"--only: no such row {sorted(unknown)}; rows: {[p[2] for p in PAIRS]}"
            )
        rows = [p for p in PAIRS if p[2] in args.only]
    officials: dict[str, set[str]] = {"segearth": set(), "activesam": set()}
    for _, _, _, side, run in rows:
        officials[side].add(run)
    return [key for key in OURS_RUNS if not args.only or key in args.only], officials


# Top-level model stages (their times add up); the pixel decoder is inside the head.
MODEL_STAGES = {
    "forward_image": "vision backbone",
    "forward_text": "text encoder",
    "_encode_prompt": "prompt + geometry encoder",
    "_run_encoder": "DETR encoder",
    "_run_decoder": "decoder + scores",
    "_run_segmentation_heads": "segmentation head",
}


def ade20k_names() -> list[str]:
    from cliptrase.classfile import ClassList

    names = list(ClassList.from_preset("ade20k").names)
    assert len(names) == 150
    return names


def class_file(out: Path, count: int) -> Path:
    path = out / f"ade20k_{count}.txt"
    path.write_text("\n".join(ade20k_names()[:count]))
    return path


class Profile:
    """Seconds per model stage, via wrappers on the model's bound methods; calls inside a
    preview are counted apart."""

    def __init__(self, model: torch.nn.Module):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.phase = ""
        for attr in ("forward_image", "forward_text"):
            self._wrap(model.backbone, attr, attr)
        for attr in ("_encode_prompt", "_run_encoder", "_run_decoder", "_run_segmentation_heads"):
            self._wrap(model, attr, attr)
        self._wrap(model.segmentation_head.pixel_decoder, "forward", "pixel_decoder")

    def _wrap(self, owner, attr: str, name: str) -> None:
        function = getattr(owner, attr)
        profile = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                key = profile.phase + name
                profile.seconds[key] += time.perf_counter() - start
                profile.calls[key] += 1

        setattr(owner, attr, timed)

    def preview(self, owner, attr: str) -> None:
        """Calls inside ``owner.attr`` are the preview's."""
        function = getattr(owner, attr)
        profile = self

        def in_preview(*args, **kwargs):
            profile.phase = "preview."
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                profile.phase = ""
                profile.seconds["preview"] += time.perf_counter() - start
                profile.calls["preview"] += 1

        setattr(owner, attr, in_preview)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def report(self, total: float) -> dict:
        stages = {k: round(v, 2) for k, v in sorted(self.seconds.items())}
        accounted = sum(self.seconds.get(k, 0.0) for k in MODEL_STAGES) + self.seconds.get(
            "preview", 0.0
        )
        return {
            "total": round(total, 2),
            "stages": stages,
            "calls": dict(sorted(self.calls.items())),
            "post_processing": round(total - accounted, 2),
        }


def _peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _save_labels(out: Path, key: str, labels: np.ndarray) -> None:
    (out / "speed").mkdir(parents=True, exist_ok=True)
    np.save(out / "speed" / f"{key}.npy", labels.astype(np.int64))


# ----------------------------------------------------------------------------- ours
def stage_env(stage: str, args) -> dict[str, str]:
    """The stage's process environment: ours gets what a pipeline actor of the SAM 3 family
    gets (pipeline.allocator.actor_env); the official code runs in the environment as it is,
    or with huge pages too under ``--official-huge-pages``."""
    from pipeline.allocator import HUGE_PAGES_ENV, actor_env

    if stage == "ours":
        return {**os.environ, **actor_env("segearthov3")}
    if args.official_huge_pages and stage in ("segearth", "activesam20", "activesam150"):
        return {**os.environ, HUGE_PAGES_ENV: "1"}
    return dict(os.environ)


def host_settings() -> dict:
    from pipeline.allocator import HUGE_PAGES_ENV

    return {HUGE_PAGES_ENV: os.environ.get(HUGE_PAGES_ENV)}


def stage_ours(args) -> None:
    from cliptrase.sam3 import load_sam3_segmentor, method_for_dataset
    from pipeline.allocator import actor_env, reuse_freed_memory

    if any(os.environ.get(k) != v for k, v in actor_env("segearthov3").items()):
        print(f"warning: not the actors' environment {actor_env('segearthov3')}", flush=True)
    # As a pipeline actor runs (RunConfig.reuse_host_memory, on by default).
    reused = reuse_freed_memory()
    seg = load_sam3_segmentor("sam3", pretrained=str(args.weights), device="cpu")
    profile = Profile(seg.model)
    photo = parity.load_photo(parity.photo_paths(args.out)[IMAGE])
    names = ade20k_names()
    results = {"_code": parity.code_version(), "_host": {**host_settings(), "reuse": reused}}

    def run(key: str) -> None:
        method, count, bucket = OURS_RUNS[key]
        options = method_for_dataset(method, "ade20k").with_options(bucket_size=bucket)
        variant = seg.variant(method=options)
        if variant.preview_side is not None:
            profile.preview(variant, "_active_prompts")
        start = time.perf_counter()
        vocab = variant.vocabulary(names[:count])
        text_seconds = time.perf_counter() - start
        profile.reset()
        start, cpu = time.perf_counter(), time.process_time()
        result = variant.segment_batch([variant.prepare(photo)], vocab)[0]
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
        _save_labels(args.out, f"ours_{key}", result.labels)
        results[key] = {
            "method": method,
            "prompts": count,
            "bucket_size": bucket,
            "vocabulary_seconds": round(text_seconds, 2),
            "kept_instances": variant.last_run.kept_instances,
            "pairs_decoded": variant.last_run.pairs,
            "groundings": variant.last_run.groundings,
            "cpu_seconds": round(cpu, 1),
            "peak_rss_gb": _peak_rss_gb(),
            **profile.report(total),
        }
        print(f"ours {key}: {total:.1f} s (+ vocabulary {text_seconds:.1f} s)", flush=True)
        parity._merge_json(args.out / "speed_ours.json", results)  # kept if a later run dies

    # SegEarth-OV3's official loop grounds one prompt per forward; ours at bucket 1 does the
    # same; the _k16 runs say what buckets (every preset's default) change.
    keys, _ = planned(args)
    if "a_segearthov3_20" in keys:
        run("a_segearthov3_20")  # the real backbone, first in this process
    cache = parity.FeatureCache(args.out)
    cache.install(seg.model)
    profile._wrap(seg.model.backbone, "forward_image", "forward_image")
    for key in keys:
        if key.startswith("b_"):
            run(key)


# ----------------------------------------------------------------------------- official
def stage_segearth(args) -> None:
    parity.official_imports(args.segearth, args.out)
    import segearthov3_segmentor as official

    record: dict = {}
    official.build_sam3_image_model = parity.cpu_builder(args.segearth, args.weights, record)
    paths = parity.photo_paths(args.out)
    results = {}
    profile = None
    cache = None

    def run(key: str, count: int, cached: bool, subset: int | None = None) -> None:
        nonlocal profile, cache
        seg = official.SegEarthOV3Segmentation(
            classname_path=str(class_file(args.out, count)),
            device=torch.device("cpu"),
            confidence_threshold=0.3,  # configs/cfg_ade20k.py
            prob_thd=0.0,
        )
        model = seg.processor.model  # one model per process (the builder is memoised)
        if profile is None:
            profile = Profile(model)
        if cached and cache is None:
            cache = parity.FeatureCache(args.out)
            cache.install(model)
            profile._wrap(model.backbone, "forward_image", "forward_image")
        if subset is not None:
            seg.query_words = seg.query_words[:subset]
            seg.num_queries = seg.num_cls = subset
            seg.query_idx = seg.query_idx[:subset]
        profile.reset()
        sample = parity.DataSample(str(paths[IMAGE]), parity.IMAGES[IMAGE])
        start, cpu = time.perf_counter(), time.process_time()
        seg.predict(None, [sample])
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
        labels = sample.data["pred_sem_seg"].data[0].numpy()
        if subset is None:
            _save_labels(args.out, f"segearth_{key}", labels)
        results[key] = {
            "prompts": count,
            "timed_prompts": subset or count,
            "cpu_seconds": round(cpu, 1),
            "peak_rss_gb": _peak_rss_gb(),
            **profile.report(total),
        }
        if subset is not None:
            results[key]["extrapolated_total"] = round(total * count / subset, 1)
        print(f"official SegEarth-OV3 {key}: {total:.1f} s", flush=True)
        parity._merge_json(args.out / "speed_segearth.json", results)

    _, officials = planned(args)
    if "a_20" in officials["segearth"]:
        run("a_20", 20, cached=False)
    if "b_20" in officials["segearth"]:
        run("b_20", 20, cached=True)
    if "b_150" in officials["segearth"]:
        run("b_150", 150, cached=True, subset=args.official_prompts)
    results["_process"] = record
    results["_host"] = host_settings()
    parity._merge_json(args.out / "speed_segearth.json", results)


def stage_activesam(args, count: int) -> None:
    if f"b_{count}" not in planned(args)[1]["activesam"]:
        return
    parity.official_imports(args.activesam, args.out)
    try:
        import nltk  # noqa: F401

        raise SystemExit("nltk is installed: the official run would add WordNet hypernym tokens")
    except ImportError:
        pass
    import activesam
    from activesam.model import base

    record: dict = {}
    base.build_sam3_image_model = parity.cpu_builder(args.activesam, args.weights, record)
    start = time.perf_counter()
    seg = activesam.ActiveSAM(  # configs/base_config.py + cfg_ade20k.py (prob_thd 0)
        classname_path=str(class_file(args.out, count)),
        device=torch.device("cpu"),
        prob_thd=0.0,
        confidence_threshold=0.3,
        bucket_size=BUCKET,
    )
    construction = time.perf_counter() - start
    model = seg.processor.model
    parity.FeatureCache(args.out).install(model)
    profile = Profile(model)
    profile.preview(seg.pruner, "preview_and_decide")
    active = []
    decide = seg.pruner._decide_active

    def decide_active(scores):
        chosen = decide(scores)
        active.append(chosen)
        return chosen

    seg.pruner._decide_active = decide_active
    sample = parity.DataSample(str(parity.photo_paths(args.out)[IMAGE]), parity.IMAGES[IMAGE])
    start, cpu = time.perf_counter(), time.process_time()
    seg.predict(None, [sample])
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    labels = sample.data["pred_sem_seg"].data[0].numpy()
    _save_labels(args.out, f"activesam_b_{count}", labels)
    results = {
        f"b_{count}": {
            "prompts": count,
            "construction_seconds_incl_model_build": round(construction, 1),
            "active": active,
            "cpu_seconds": round(cpu, 1),
            "peak_rss_gb": _peak_rss_gb(),
            **profile.report(total),
        },
        f"_process_{count}": record,
        f"_host_{count}": host_settings(),
    }
    print(f"official ActiveSAM {count}: {total:.1f} s", flush=True)
    parity._merge_json(args.out / "speed_activesam.json", results)


# ----------------------------------------------------------------------------- report
def _agreement(out: Path, a: str, b: str) -> float | None:
    pa, pb = out / "speed" / f"{a}.npy", out / "speed" / f"{b}.npy"
    if not (pa.exists() and pb.exists()):
        return None
    return float(np.mean(np.load(pa) == np.load(pb)))


def stage_report(args) -> dict:
    out = args.out

    def read(name: str) -> dict:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else {}

    ours = read("speed_ours.json")
    code = ours.pop("_code", None)
    seg, act = read("speed_segearth.json"), read("speed_activesam.json")
    host = {
        "ours": ours.pop("_host", None),
        "segearth": seg.get("_host"),
        "activesam": {k: v for k, v in act.items() if k.startswith("_host_")},
    }

    def official_total(entry):
        return entry.get("extrapolated_total", entry["total"])

    def official_cpu(entry):
        return round(
            entry["cpu_seconds"] * entry["prompts"] / entry.get("timed_prompts", entry["prompts"]),
            1,
        )

    officials = {"segearth": ("SegEarth-OV3", seg), "activesam": ("ActiveSAM", act)}
    rows = []
    for what, count, key, side, run in PAIRS:
        if key not in ours or run not in officials[side][1]:
            continue  # not measured in this run (--only)
        name, entry = officials[side][0], officials[side][1][run]
        agreement = _agreement(out, f"ours_{key}", f"{side}_{run}")
        rows.append(
            {
                "what": what,
                "prompts": count,
                "ours": key,
                "ours_seconds": ours[key]["total"],
                "ours_vocabulary_seconds": ours[key]["vocabulary_seconds"],
                "official": name,
                "official_seconds": official_total(entry),
                "official_extrapolated": "extrapolated_total" in entry,
                "official_timed_prompts": entry.get("timed_prompts", count),
                "speedup": round(official_total(entry) / ours[key]["total"], 2),
                "ours_cpu_seconds": ours[key]["cpu_seconds"],
                "official_cpu_seconds": official_cpu(entry),
                "cpu_speedup": round(official_cpu(entry) / ours[key]["cpu_seconds"], 2),
                "label_agreement": agreement,
            }
        )
        if agreement is not None:
            assert agreement >= AGREEMENT_MIN, (key, agreement)
    backbone = ours.get("a_segearthov3_20", {}).get("stages", {}).get("forward_image")
    scaling = [
        {
            "prompts": n,
            "after_backbone_seconds": ours[f"b_segearthov3_{n}"]["total"],
            "per_prompt": round(ours[f"b_segearthov3_{n}"]["total"] / n, 2),
            "with_backbone_seconds": round(backbone + ours[f"b_segearthov3_{n}"]["total"], 1),
        }
        for n in SIZES
        if backbone is not None and f"b_segearthov3_{n}" in ours
    ]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": parity.machine(torch_threads=torch.get_num_threads(), gpu="none"),
        "code": code,
        "image": {IMAGE: parity.IMAGES[IMAGE]},
        "rows": rows,
        "scaling": scaling,
        "backbone_seconds": backbone,
        "host_settings": host,
        "profiles": {
            "ours": {k: v for k, v in ours.items()},
            "segearth": {k: v for k, v in seg.items() if not k.startswith("_")},
            "activesam": {k: v for k, v in act.items() if not k.startswith("_")},
        },
    }
    (out / "speed.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "speed.md").write_text(markdown(result))
    print(markdown(result))
    return result


def _profile_line(entry: dict) -> str:
    s = entry["stages"]
    parts = [f"{label} {s[k]:.1f}" for k, label in MODEL_STAGES.items() if s.get(k)]
    if s.get("pixel_decoder"):
        parts.append(f"(pixel decoder {s['pixel_decoder']:.1f})")
    if s.get("preview"):
        parts.append(f"preview {s['preview']:.1f}")
    parts.append(f"post-processing {entry['post_processing']:.1f}")
    return ", ".join(parts)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"SAM 3 speed, {result['date']}, {m['cpus']} CPU cores ({m['machine']}), torch "
        f"{m['torch']}, float32, full-size SAM 3 (random weights), astronaut 480x480; no GPU",
        "",
        "| stage | prompts | ours (s) | official (s) | speedup | CPU time ours / official (s) |"
        " CPU-time speedup | labels agreeing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    host = result.get("host_settings") or {}
    lines[1:1] = ["", f"Host allocator settings by side: {json.dumps(host)}"]
    for r in result["rows"]:
        official = f"{r['official']} {r['official_seconds']:.1f}"
        if r["official_extrapolated"]:
            official += f" (timed on {r['official_timed_prompts']} prompts, x linear)"
        agreement = "-" if r["label_agreement"] is None else f"{100 * r['label_agreement']:.3f} %"
        lines.append(
            f"| {r['what']} ({r['ours'].split('_')[1]}) | {r['prompts']} | {r['ours_seconds']:.1f} "
            f"| {official} | {r['speedup']:.2f}x | {r['ours_cpu_seconds']:.0f} / "
            f"{r['official_cpu_seconds']:.0f} | {r['cpu_speedup']:.2f}x | {agreement} |"
        )
    if result["scaling"]:
        lines += [
            "",
            "Ours (`segearthov3`) per image against the vocabulary size:",
            "",
            "| prompts | after the backbone (s) | per prompt (s) | with the backbone (s) |",
            "|---|---|---|---|",
        ]
    for s in result["scaling"]:
        lines.append(
            f"| {s['prompts']} | {s['after_backbone_seconds']:.1f} | {s['per_prompt']:.2f} "
            f"| {s['with_backbone_seconds']:.1f} |"
        )
    lines += ["", "Where the time goes (s):", ""]
    for side, entries in result["profiles"].items():
        for key, entry in entries.items():
            lines.append(f"* {side} {key}: {_profile_line(entry)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parity.add_official_args(parser)
    parser.add_argument("--official-prompts", type=int, default=None)
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        default=None,
        help="rows of the table to measure, by our run's key (comma-separated), and only the "
        "official runs they compare with; the report then lists only those rows",
    )
    parser.add_argument(
        "--official-huge-pages",
        action="store_true",
        help="the official code's processes get THP_MEM_ALLOC_ENABLE=1 too (ours always do)",
    )
    args = parser.parse_args()
    if args.stage == "all":
        for stage in STAGES:
            print(f"--- stage {stage}", flush=True)
            subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--stage", stage],
                check=True,
                env=stage_env(stage, args),
            )
        return
    {
        "ours": stage_ours,
        "segearth": stage_segearth,
        "activesam20": lambda a: stage_activesam(a, 20),
        "activesam150": lambda a: stage_activesam(a, 150),
        "report": stage_report,
    }[args.stage](args)


if __name__ == "__main__":
    main()
