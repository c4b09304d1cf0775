"""Vocabulary compile time: full-context ``encode_text`` (old) against the truncated tower (new).

    OMP_WAIT_POLICY=PASSIVE python bench/vocabulary.py                     # 10 and 150 classes
    python bench/vocabulary.py --classes 10,150 --repeats 3,1 --threads 2  # fewer 150-class runs
    python bench/vocabulary.py --model ViT-Tiny-16-test --device cuda

Compiles one embedding row per class from the 80 OpenAI ImageNet templates, as
``Segmentor.vocabulary`` does: *old* is the previous formula (every chunk of 1024 prompts
through ``clip.encode_text`` on the full 77-token context), *new* is
``cliptrase.text.class_embeddings`` (prompts sorted by length, each forward cut to its longest
prompt). Class names are the first N of the ADE20K preset (150 classes). Old and new alternate
in one process and medians are reported, so load changes on a noisy machine hit both alike;
``max |diff|`` is the largest difference of the unit rows. Random weights (no download): the
cost does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see docs/benchmarks.md, Pipeline

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cliptrase  # noqa: E402
from cliptrase.classfile import ClassList  # noqa: E402
from cliptrase.text import DEFAULT_TEMPLATES, class_embeddings, truncation_is_exact  # noqa: E402


@torch.inference_mode()
def old_class_embeddings(clip, tokenizer, names, templates, device, chunk: int = 1024):
    """The formula before truncation: each chunk through ``encode_text`` on the full context."""
    prompts = [template(name) for name in names for template in templates]
    parts = []
    for start in range(0, len(prompts), chunk):
        tokens = tokenizer(prompts[start : start + chunk]).to(device)
        parts.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(parts).reshape(len(names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def _timed(fn, device: torch.device):
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def compare(seg, names: list[str], repeats: int) -> dict:
    templates = DEFAULT_TEMPLATES
    args = (seg.clip, seg.tokenizer, names, templates, seg.device)
    old_times, new_times, diff = [], [], 0.0
    for _ in range(repeats):
        old_s, old = _timed(lambda: old_class_embeddings(*args), seg.device)
        new_s, new = _timed(lambda: class_embeddings(*args), seg.device)
        old_times.append(old_s)
        new_times.append(new_s)
        diff = max(diff, (old - new).abs().max().item())
    old_s, new_s = statistics.median(old_times), statistics.median(new_times)
    return {
        "classes": len(names),
        "prompts": len(names) * len(templates),
        "repeats": repeats,
        "old_s": old_s,
        "new_s": new_s,
        "ratio": new_s / old_s,
        "diff": diff,
    }


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", default="10,150", help="class counts, comma-separated")
    parser.add_argument(
        "--repeats", default="3", help="runs of each side, one for all or one per class count"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    counts, repeats = _ints(args.classes), _ints(args.repeats)
    if len(repeats) == 1:
        repeats *= len(counts)
    if len(repeats) != len(counts):
        parser.error("--repeats: give one number, or one per --classes entry")
    preset = list(ClassList.from_preset("ade20k").names)
    if max(counts) > len(preset):
        parser.error(f"--classes: at most {len(preset)} (the ADE20K preset)")

    seg = cliptrase.load_segmentor(args.model, pretrained=None, device=args.device)
    warm = preset[:1]  # first calls allocate; keep them out of the figures
    old_class_embeddings(seg.clip, seg.tokenizer, warm, DEFAULT_TEMPLATES, seg.device)
    class_embeddings(seg.clip, seg.tokenizer, warm, DEFAULT_TEMPLATES, seg.device)

    print(
        f"# {args.model}, random weights, {seg.device}, {len(DEFAULT_TEMPLATES)} templates, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; truncation exact: "
        f"{truncation_is_exact(seg.clip)}"
    )
    print()
    print(
        "| classes | prompts | repeats | old (full context) s | new (truncated) s | new/old | max abs diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count, n in zip(counts, repeats):
        row = compare(seg, preset[:count], n)
        print(
            f"| {row['classes']} | {row['prompts']} | {row['repeats']} | {row['old_s']:.2f} | "
            f"{row['new_s']:.2f} | {row['ratio']:.3f} | {row['diff']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
