"""Peak RSS of ``ShardLabeler.process_shard`` against the shard's length: it must not grow.

    python bench/shard_memory.py                          # 40 and 400 images at 1920x1080
    python bench/shard_memory.py --counts 20 200 --size 1280 720
    python bench/shard_memory.py --pad-kb 2048            # rows of 2 MB (see below)
    python bench/shard_memory.py --code HEAD              # the committed pipeline/, for a before

Each count runs in a fresh subprocess: the tiny test model (``ViT-Tiny-16-test``, random
weights), one WebDataset tar (``key.jpg``) of JPEGs cut from scikit-image's sample photos
upscaled to ``--size``, output on local disk; the child reports ``ru_maxrss`` (peak RSS over
its whole life, model load included) and its RSS right after the model is loaded. Labels are
stored at the original size, so the per-image arrays (a 1080p uint8 mask is 2 MB) do not
depend on the model's resolution: the tiny model keeps the run short and the memory real.

``--pad-kb N`` appends N KB of random bytes to every mask PNG. The tiny random model's masks
are blocky and compress to ~2 KB a row, so holding every row of a shard costs little here;
with rows the size of noisy masks (up to the 2 MB of a raw 1080p mask) holding them all is
what grows with the shard.

``--code REV`` runs ``pipeline/`` as committed at ``REV`` (``git archive`` into a temporary
folder put first on ``PYTHONPATH``) with today's ``cliptrase``: the working tree is untouched.
``tests/pipeline/test_shard_memory.py`` runs a smaller pair of the same measurement.

Measured (2 shared cores, batch 8, peak RSS in MB for 40 -> 400 images at 1920x1080; ~1060 MB
after the model is loaded in every case):

* streaming (this code): 1587 -> 1734 (x1.09); with ``--pad-kb 2048``: 1676 -> 1827 (x1.09).
  At 1280x720, 100 / 400 / 800 images: 1462 / 1491 / 1496: flat; the spread at 1080p is the
  timing of transient peaks (a batch of 1080p logits inside ``segment_batch``), not growth.
* every row held until the end (``--code`` before streaming): 1629 -> 1680 (x1.03) with the
  ~2 KB rows; with ``--pad-kb 2048``: 1665 -> 3644 (x2.19, 5.5 MB per extra image: the rows,
  plus one table and one file buffer of them all at the end).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

try:  # run as a script (python bench/shard_memory.py): this folder is first on sys.path
    from _common import numbered, photo_jpegs, print_json, write_tar
except ModuleNotFoundError:  # loaded by its path from the repository root (the memory test)
    from bench._common import numbered, photo_jpegs, print_json, write_tar

REPO = Path(__file__).resolve().parents[1]


def child(tar: str, output: str, batch_size: int, pad_kb: int = 0) -> None:
    """In a fresh process: label the one shard in ``tar``; print what memory it took."""
    import resource

    import pipeline
    from pipeline import ledger, sink
    from pipeline.worker import ShardLabeler

    if pad_kb:
        encode_png, pad = sink.encode_png, os.urandom(pad_kb * 1024)

        def padded_encode_png(array, *args, **kwargs):
            png = encode_png(array, *args, **kwargs)
            return png + pad if array.ndim == 2 and array.size > 100_000 else png  # masks only

        sink.encode_png = padded_encode_png

    spec = pipeline.SegmentorSpec(
        model="ViT-Tiny-16-test",
        pretrained=None,
        precision="fp32",
        short_side=64,
        max_patches=64,
        batch_size=batch_size,
    )
    config = pipeline.RunConfig(
        inputs=(tar,),
        output=output,
        segmentor=spec,
        vocabulary=pipeline.VocabularySpec(("person", "cat", "coffee cup", "rocket"), ("sky",)),
        torch_threads=2,
        decode_threads=2,
        prefetch_images=2 * batch_size,
    )
    labeler = ShardLabeler(config)
    (shard,) = pipeline.list_shards(tar)
    loaded_kb = _rss_kb()
    result = labeler.process_shard(shard)
    file_bytes = labeler.layout.fs.size(ledger.committed_file(labeler.layout, shard.shard_id))
    print_json(
        {
            "rows": result.rows,
            "ok": result.ok,
            "seconds": round(result.seconds, 2),
            "kb_per_row_in_file": round(file_bytes / 1024 / max(1, result.rows), 1),
            "rss_after_load_mb": round(loaded_kb / 1024, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    )


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure(
    count: int,
    size: tuple[int, int],
    workdir: Path,
    *,
    batch_size: int = 8,
    pad_kb: int = 0,
    pythonpath: str | None = None,
    jpegs: list[bytes] | None = None,
) -> dict:
    """Peak RSS (and more) of a subprocess labelling one tar shard of ``count`` images."""
    folder = Path(tempfile.mkdtemp(dir=workdir))
    tar = write_tar(folder / f"{count:05d}.tar", numbered(jpegs or photo_jpegs(size), count))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    args = [sys.executable, str(Path(__file__).resolve()), "--child", str(tar)]
    args += [str(folder / "out"), "--batch", str(batch_size)]
    args += ["--pad-kb", str(pad_kb)]
    done = subprocess.run(args, env=env, cwd=workdir, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    tar.unlink()
    return {
        "images": count,
        "size": f"{size[0]}x{size[1]}",
        "pad_kb": pad_kb,
        **result,
    }


def code_at(rev: str, into: Path) -> str:
    """``pipeline/`` as committed at ``rev``, unpacked under ``into``; returns the folder."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "pipeline"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return str(into)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[40, 400])
    parser.add_argument("--size", type=int, nargs=2, default=[1920, 1080], metavar=("W", "H"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--pad-kb",
        type=int,
        default=0,
        help="append this many KB of random bytes to every mask PNG (see the docstring)",
    )
    parser.add_argument("--code", default=None, help="a git revision of pipeline/ to measure")
    parser.add_argument("--child", nargs=2, metavar=("TAR", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: 10 and 40 images of 640x360"
    )
    args = parser.parse_args()
    if args.quick:
        args.counts, args.size = [10, 40], [640, 360]
    if args.child:
        child(*args.child, batch_size=args.batch, pad_kb=args.pad_kb)
        return
    size = tuple(args.size)
    jpegs = photo_jpegs(size)
    with tempfile.TemporaryDirectory() as work:
        pythonpath = code_at(args.code, Path(work) / "code") if args.code else None
        rows = [
            measure(
                n,
                size,
                Path(work),
                batch_size=args.batch,
                pad_kb=args.pad_kb,
                pythonpath=pythonpath,
                jpegs=jpegs,
            )
            for n in args.counts
        ]
    for row in rows:
        print_json({"code": args.code or "working tree", **row})
    print_json(
        {
            "code": args.code or "working tree",
            "peak_ratio": round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3),
            "mb_per_extra_image": round(
                (rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"])
                / max(1, rows[-1]["images"] - rows[0]["images"]),
                3,
            ),
        }
    )


if __name__ == "__main__":
    main()
