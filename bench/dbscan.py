"""DBSCAN's neighbour graph on the CPU: the whole float64 distance matrix vs the banded one.

    python bench/dbscan.py                      # tiny model and ViT-B-16, 640x480 and 1920x1080
    python bench/dbscan.py --models ViT-B-16 --repeats 15
    python bench/dbscan.py --quick              # a check that it runs

The rows are CLIPtrase's recalibrated correlation ``R`` of sample photos (random weights: the
graph's density depends on them, the cost of the whole matrix does not). Both graphs are
computed from the same ``R`` with the radius the product uses, alternating, in one process;
the table gives their medians, the ratio, the share of pairs the band computed and whether the
two graphs are identical (they must be: ``cliptrase.dbscan.banded_graph`` skips only
pairs that provably fail the radius).
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _common import photo, print_table, timed  # noqa: E402
from PIL import Image  # noqa: E402

import cliptrase  # noqa: E402
from cliptrase import dbscan as _dbscan  # noqa: E402

PHOTOS = ("astronaut", "coffee", "rocket")
SIZES = ((640, 480), (1920, 1080))


def whole_graph(rows: torch.Tensor, radius2: float) -> torch.Tensor:
    """The whole-matrix graph DBSCAN builds on a GPU (and for rows the band cannot take)."""
    return _dbscan._whole_graph(rows[None], torch.tensor([radius2], dtype=torch.float64))[0]


def band_share(rows: torch.Tensor, radius2: float) -> float:
    """The share of the ``n x n`` pairs whose distances the band computes (its tiles' blocks)."""
    x = rows.to(torch.float64)
    _, tiles = _dbscan.band_tiles(x, (x * x).sum(dim=-1), radius2)
    return sum((stop - start) * (end - start) for start, stop, end in tiles) / x.shape[0] ** 2


def correlation(seg, image: Image.Image) -> torch.Tensor:
    vocab = seg.vocabulary(["person", "rocket", "cup"], background=["sky"])
    with torch.inference_mode():
        feats = seg.dense_features(seg.prepare(image).pixels[None], vocab)
    return feats.correlation.float()[0]


def rows_of_table(models: list[str], sizes, repeats: int):
    """One table row per model, size and photo: the two graphs timed alternately."""
    for model in models:
        seg = cliptrase.load_segmentor(model, pretrained=None, device="cpu")
        for width, height in sizes:
            for name in PHOTOS:
                rows = correlation(seg, photo(name).resize((width, height), Image.BICUBIC))
                eps, _ = seg.method.refiner.eps_for(rows[None])
                radius2 = float(_dbscan._eps_squared(eps, 1, rows.device, True)[0])
                times = {"whole": [], "banded": []}
                for _ in range(repeats):
                    for kind, graph in (("whole", whole_graph), ("banded", _dbscan.banded_graph)):
                        with timed() as spent:
                            graph(rows, radius2)
                        times[kind].append(1000 * spent.wall_s)
                whole, banded = (statistics.median(times[k]) for k in ("whole", "banded"))
                same = torch.equal(
                    whole_graph(rows, radius2), _dbscan.banded_neighbours(rows, radius2)
                )
                yield [model, f"{name} {width}x{height}", rows.shape[0], f"{whole:.1f}",
                       f"{banded:.1f}", f"{banded / whole:.2f}",
                       f"{band_share(rows, radius2):.0%}", "yes" if same else "NO"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="ViT-Tiny-16-test,ViT-B-16")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: tiny model, 640x480, 3 repeats"
    )
    args = parser.parse_args()
    models, sizes = args.models.split(","), SIZES
    if args.quick:
        models, sizes, args.repeats = ["ViT-Tiny-16-test"], SIZES[:1], 3
    torch.set_num_threads(1)
    print("CPU, 1 thread, RANDOM weights")
    print_table(
        ["model", "image", "rows", "whole ms", "banded ms", "banded / whole", "pairs computed",
         "same graph"],
        rows_of_table(models, sizes, args.repeats),
    )  # fmt: skip


if __name__ == "__main__":
    main()
