"""Vocabulary compile time: open_clip's full-context ``encode_text`` against our truncated tower.

    OMP_WAIT_POLICY=PASSIVE python bench/vocabulary.py                     # 10 and 150 classes
    python bench/vocabulary.py --classes 10,150 --repeats 3,1 --threads 2  # fewer 150-class runs
    python bench/vocabulary.py --model ViT-Tiny-16-test --device cuda
    python bench/vocabulary.py --quick                                     # a check that it runs

Compiles one embedding row per class from the 80 OpenAI ImageNet templates, as
``Segmentor.vocabulary`` does, both ways: *encode_text* runs every chunk of 1024 prompts
through open_clip's own ``clip.encode_text`` on the full 77-token context (the formula
``cliptrase.text`` used before truncation, on the library's live code); *ours* is
``cliptrase.text.class_embeddings`` (prompts sorted by length, each forward cut to its longest
prompt). Class names are the first N of the ADE20K preset (150 classes). The two alternate in
one process and medians are reported, so load changes on a noisy machine hit both alike;
``max |diff|`` is the largest difference of the unit rows. Random weights (no download): the
cost does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see docs/benchmarks.md, Pipeline

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import machine, print_json, print_table, synchronize, timed  # noqa: E402

import cliptrase  # noqa: E402
from cliptrase.classfile import ClassList  # noqa: E402
from cliptrase.text import DEFAULT_TEMPLATES, class_embeddings, truncation_is_exact  # noqa: E402


@torch.inference_mode()
def encode_text_embeddings(clip, tokenizer, names, templates, device, chunk: int = 1024):
    """Each chunk of prompts through open_clip's ``encode_text`` on the full context."""
    prompts = [template(name) for name in names for template in templates]
    parts = []
    for start in range(0, len(prompts), chunk):
        tokens = tokenizer(prompts[start : start + chunk]).to(device)
        parts.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(parts).reshape(len(names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def _timed(fn, device: torch.device):
    with timed() as spent:
        out = fn()
        synchronize(device)
    return spent.wall_s, out


def compare(seg, names: list[str], repeats: int) -> dict:
    templates = DEFAULT_TEMPLATES
    args = (seg.clip, seg.tokenizer, names, templates, seg.device)
    full_times, ours_times, diff = [], [], 0.0
    for _ in range(repeats):
        full_s, full = _timed(lambda: encode_text_embeddings(*args), seg.device)
        ours_s, ours = _timed(lambda: class_embeddings(*args), seg.device)
        full_times.append(full_s)
        ours_times.append(ours_s)
        diff = max(diff, (full - ours).abs().max().item())
    full_s, ours_s = statistics.median(full_times), statistics.median(ours_times)
    return {
        "classes": len(names),
        "prompts": len(names) * len(templates),
        "repeats": repeats,
        "encode_text_s": full_s,
        "ours_s": ours_s,
        "ratio": ours_s / full_s,
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
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: tiny model, 10 classes, once"
    )
    args = parser.parse_args()
    if args.quick:
        args.model, args.classes, args.repeats = "ViT-Tiny-16-test", "10", "1"
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
    encode_text_embeddings(seg.clip, seg.tokenizer, warm, DEFAULT_TEMPLATES, seg.device)
    class_embeddings(seg.clip, seg.tokenizer, warm, DEFAULT_TEMPLATES, seg.device)

    print_json(machine(torch_threads=torch.get_num_threads()))
    print(
        f"# {args.model}, random weights, {seg.device}, {len(DEFAULT_TEMPLATES)} templates; "
        f"truncation exact: {truncation_is_exact(seg.clip)}"
    )
    print()
    print_table(
        ["classes", "prompts", "repeats", "open_clip encode_text s", "ours s",
         "ours / encode_text", "max abs diff"],
        (
            [row["classes"], row["prompts"], row["repeats"], f"{row['encode_text_s']:.2f}",
             f"{row['ours_s']:.2f}", f"{row['ratio']:.3f}", f"{row['diff']:.1e}"]
            for row in (compare(seg, preset[:count], n) for count, n in zip(counts, repeats))
        ),
    )  # fmt: skip


if __name__ == "__main__":
    main()
