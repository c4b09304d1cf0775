"""One command that measures what matters on a CUDA machine, in a few minutes.

    python bench/gpu_check.py --out gpu_check            # on a GPU machine (<= ~8 minutes)
    python bench/gpu_check.py --dry-run --out /tmp/gc    # the same steps, tiny sizes, on a CPU

Steps (each timed, each allowed to fail without stopping the others; the report says which):

1. the CUDA-parametrised tests (pytest ``-k cuda``: device post-processing, DBSCAN, median,
   GPU JPEG decoding against their CPU references);
2. bf16 vs fp32 label agreement (ViT-B/16) on the sample photos;
3. device post-processing == CPU: the same segmentor on CUDA and on the CPU, fp32;
4. GPU JPEG decoding (nvjpeg through torchvision) against Pillow: pixel difference, images/s;
5. images/s of ViT-B/16 at short side 336 through ``segment_batch`` at batch 16/32/64, bf16,
   from prepared 1920x1080 photos, with the GPU's busy fraction (nvidia-smi sampling);
6. the whole pipeline (1 actor, one GPU) over a local tar of 2,000 1920x1080 JPEGs it writes
   itself: images/s, host CPU seconds per image (the actor's ``cpu_s``), busy fraction;
7. the same with ``SourceSpec(gpu_decode=True)``: JPEGs decoded and resized on the GPU;
8. the SAM 3 methods (full SAM 3, 1008 px, bf16 autocast): images/s of ``segearthov3`` and
   ``activesam`` at 20 and 150 classes, peak GPU memory per configuration (the memory plan of
   ``cliptrase/sam3/segmentor.py``), and bf16 vs fp32 label agreement.

Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` and exits 1 if any step failed
(.ci/run runs ``--dry-run``, so the steps cannot rot while no GPU is lent). Random weights
throughout (no download): every output says so; timings do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cliptrase  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")
CLASSES = ["person", "cat", "cup", "rocket", "road", "tree", "car", "building"]
BACKGROUND = ["background", "sky", "wall"]


def _photo(name: str) -> np.ndarray:
    array = getattr(skimage.data, name)()
    return np.stack([array] * 3, axis=-1) if array.ndim == 2 else array[..., :3]


def photos(size: tuple[int, int] | None = None) -> list[np.ndarray]:
    out = [_photo(n) for n in PHOTOS]
    if size is not None:
        out = [np.asarray(Image.fromarray(p).resize(size, Image.BICUBIC)) for p in out]
    return out


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class BusySampler:
    """The GPU's utilisation while a block runs, from one ``nvidia-smi -lms 100`` process that
    watches the segmentor's GPU by PCI bus id (nvidia-smi's indices are not CUDA's once
    ``CUDA_VISIBLE_DEVICES`` is set). ``problem``: why there are no samples (no nvidia-smi on
    a CPU dry run; "[N/A]" where it reports none, e.g. a MIG slice)."""

    def __init__(self, device_index: int = 0):
        self.samples: list[tuple[float, float]] = []  # (monotonic s, utilisation in [0, 1])
        self.problem: str | None = None
        self._id, self._proc = _bus_id(device_index), None

    def __enter__(self):
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"--id={self._id}", "-lms", "100"]  # fmt: skip
        try:
            self._proc = subprocess.Popen(
                query, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        except OSError as error:
            self.problem = f"no nvidia-smi ({error})"
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            line = line.strip()
            try:
                self.samples.append((time.monotonic(), float(line) / 100))
            except ValueError:
                if line and self.problem is None:
                    self.problem = f"nvidia-smi said: {line[:200]}"

    def __exit__(self, *exc):
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._thread.join(timeout=3)

    @property
    def why_none(self) -> str | None:
        """Why there are no samples (None when there are some)."""
        if self.samples:
            return None
        return self.problem or "nvidia-smi gave no samples"

    def busy(self, since: float | None = None) -> float | None:
        """Mean utilisation of the samples taken after ``since`` (monotonic s; None: all)."""
        values = [u for t, u in self.samples if since is None or t >= since]
        return float(np.mean(values)) if values else None


def _bus_id(device_index: int) -> str:
    """nvidia-smi's ``--id`` for CUDA device ``device_index``: its PCI bus id."""
    if not torch.cuda.is_available():
        return str(device_index)
    props = torch.cuda.get_device_properties(device_index)
    return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ steps
def step_cuda_tests(args) -> dict:
    tests = [
        "tests/cliptrase/test_fullsize.py", "tests/cliptrase/test_dbscan.py",
        "tests/cliptrase/test_invariants.py", "tests/cliptrase/test_segment.py",
        "tests/pipeline/test_gpu_decode.py",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
         "cpu" if args.dry_run else "cuda", *tests],
        cwd=ROOT, capture_output=True, text=True, timeout=args.step_timeout,
    )
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    if out.returncode != 0:  # failures, or nothing collected (5): the step failed
        failures = [line for line in out.stdout.splitlines() if line.startswith("FAILED")]
        raise RuntimeError(f"pytest exit {out.returncode}: {last}\n" + "\n".join(failures))
    return {"exit_code": out.returncode, "summary": last}


def step_precision(args, model: str, device: torch.device) -> dict:
    fp32 = cliptrase.load_segmentor(model, pretrained=None, device=device)
    low = fp32.variant(precision="bf16", allow_cpu_autocast=True)
    vocab = fp32.vocabulary(CLASSES, BACKGROUND)
    agree = []
    for image in photos()[: args.photos]:
        a, b = fp32.segment(image, vocab), low.segment(image, vocab)
        agree.append(float((a.labels == b.labels).mean()))
    return {"model": model, "bf16_vs_fp32_agreement_min": min(agree),
            "bf16_vs_fp32_agreement_mean": float(np.mean(agree))}


def step_device_vs_cpu(args, model: str, device: torch.device) -> dict:
    cpu = cliptrase.load_segmentor(model, pretrained=None, device="cpu")
    dev = cliptrase.load_segmentor(model, pretrained=None, device=device)
    vocab_cpu = cpu.vocabulary(CLASSES, BACKGROUND)
    vocab_dev = dev.vocabulary(CLASSES, BACKGROUND)
    agree, counts_equal = [], []
    for image in photos()[: args.photos]:
        a, b = cpu.segment(image, vocab_cpu), dev.segment(image, vocab_dev)
        agree.append(float((a.labels == b.labels).mean()))
        counts_equal.append(bool(np.array_equal(b.counts, np.bincount(
            b.labels.ravel(), minlength=len(vocab_dev.names)))))
    return {"model": model, "labels_agreement_min": min(agree),
            "labels_agreement_mean": float(np.mean(agree)), "counts_consistent": all(counts_equal)}


def step_gpu_decode(args, device: torch.device) -> dict:
    from pipeline.decode import DeviceDecodedImage, decode_image, decode_jpegs_on_device

    datas = [jpeg(p) for p in photos((1920, 1080))] * max(1, args.decode_repeats)
    decode_jpegs_on_device(datas[:2], device)  # warm-up: the decoder's set-up is not its rate
    _sync(device)
    start = time.perf_counter()
    decoded = decode_jpegs_on_device(datas, device)
    _sync(device)
    gpu_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = [decode_image(d) for d in datas]
    pillow_s = time.perf_counter() - start
    diffs, on_device = [], 0
    for got, ref in zip(decoded, reference):
        if isinstance(got, DeviceDecodedImage):
            on_device += 1
            pixels = got.pixels.permute(1, 2, 0).cpu().numpy().astype(np.int16)
            diffs.append(float(np.abs(pixels - np.asarray(ref.image, np.int16)).mean()))
    return {"images": len(datas), "decoded_on_device": on_device,
            "device_images_per_s": len(datas) / gpu_s, "pillow_images_per_s": len(datas) / pillow_s,
            "mean_abs_pixel_difference_max": max(diffs) if diffs else None}


def step_segment_batch(args, model: str, device: torch.device) -> dict:
    precision = "fp32" if device.type == "cpu" else "bf16"
    seg = cliptrase.load_segmentor(model, pretrained=None, device=device, precision=precision)
    vocab = seg.vocabulary(CLASSES, BACKGROUND)
    prepared = [seg.prepare(p) for p in photos((1920, 1080))]
    rows = []
    for batch in args.batches:
        items = [prepared[i % len(prepared)] for i in range(batch)]
        seg.segment_batch(items, vocab, batch_size=batch)  # warm-up: kernels, allocator
        _sync(device)
        with BusySampler() as sampler:
            start = time.perf_counter()
            for _ in range(args.repeats):
                seg.segment_batch(items, vocab, batch_size=batch)
            _sync(device)
            seconds = time.perf_counter() - start
        rows.append({"batch": batch, "images_per_s": batch * args.repeats / seconds,
                     "gpu_busy": sampler.busy(), "gpu_busy_problem": sampler.why_none})
    return {"model": model, "precision": precision, "short_side": seg.config.short_side,
            "rows": rows}


def step_pipeline(args, model: str, device: torch.device, gpu_decode: bool = False) -> dict:
    import ray

    import pipeline

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        datas = [jpeg(p) for p in photos((1920, 1080))]
        per_shard = max(1, args.pipeline_images // 8)
        for shard, start in enumerate(range(0, args.pipeline_images, per_shard)):
            with tarfile.open(inputs / f"{shard:05d}.tar", "w") as tar:
                for i in range(start, min(start + per_shard, args.pipeline_images)):
                    info = tarfile.TarInfo(f"{i:06d}.jpg")
                    data = datas[i % len(datas)]
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        gpus = 1 if device.type == "cuda" else 0
        config = pipeline.RunConfig(
            inputs=(str(inputs) + "/",),
            output=str(Path(tmp) / "out"),
            segmentor=pipeline.SegmentorSpec(
                model=model, pretrained=None,
                precision="bf16" if gpus else "fp32", batch_size=args.batches[-1] if gpus else 8,
            ),
            vocabulary=pipeline.VocabularySpec(tuple(CLASSES), tuple(BACKGROUND)),
            source=pipeline.SourceSpec(gpu_decode=gpu_decode),
            num_actors=1,
            num_gpus_per_actor=float(gpus),
            num_cpus_per_actor=float(max(1, (os.cpu_count() or 2) - 1)),
            decode_threads=max(2, (os.cpu_count() or 2) - 2),
        )
        ray.init(num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False,
                 log_to_driver=False)
        try:
            with BusySampler() as sampler:
                started = time.monotonic()
                summary = pipeline.run(config, progress=False)
        finally:
            ray.shutdown()
        report = summary.to_dict()
        images = report["images_ok"] + report["images_error"]
        cpu_s = report["cpu_s"]
        return {"model": model, "gpu_decode": gpu_decode, "images": images, "summary": {
            k: v for k, v in report.items() if isinstance(v, int | float | str | bool)},
            "host_cpu_ms_per_image": None if not cpu_s or not images else 1000 * cpu_s / images,
            # Busy while labelling: after the actor's start-up (model load, vocabulary).
            "gpu_busy": sampler.busy(since=started + (report.get("startup_s") or 0.0)),
            "gpu_busy_whole_run": sampler.busy(), "gpu_busy_problem": sampler.why_none}


def step_sam3(args, device: torch.device) -> dict:
    """SAM 3's throughput and memory per method and vocabulary size, and bf16's agreement."""
    from cliptrase.classfile import ClassList
    from cliptrase.factory import build_segmentor

    model = "sam3-tiny" if args.dry_run else "sam3"
    ade = list(ClassList.from_preset("ade20k", "sam3").names)
    sizes = (5,) if args.dry_run else (20, 150)
    images = photos((640, 480))[: args.photos]
    rows = []
    fp32 = build_segmentor(model, None, method="segearthov3", device=str(device), precision="fp32")
    for method in ("segearthov3", "activesam"):
        seg = fp32.variant(method=method, precision="bf16" if device.type == "cuda" else "fp32")
        for size in sizes:
            vocab = seg.vocabulary(ade[:size])
            prepared = [seg.prepare(image) for image in images]
            seg.segment_batch(prepared[:1], vocab)  # warm-up
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            results = seg.segment_batch(prepared, vocab)
            _sync(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows.append({"method": method, "classes": size, "precision": seg.identity.precision,
                         "images_per_s": len(prepared) / seconds, "peak_gib": peak,
                         "labels": [r.labels.shape for r in results][:1]})
    agreement = None
    if device.type == "cuda":
        low = fp32.variant(precision="bf16")
        vocab_a, vocab_b = fp32.vocabulary(ade[:20]), low.vocabulary(ade[:20])
        agree = [float((fp32.segment_batch([fp32.prepare(i)], vocab_a)[0].labels
                        == low.segment_batch([low.prepare(i)], vocab_b)[0].labels).mean())
                 for i in images[:2]]  # fmt: skip
        agreement = min(agree)
    return {"model": model, "rows": rows, "bf16_vs_fp32_agreement_min": agreement}


# ------------------------------------------------------------------------------------ main
def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['device']}, {report['date']})", "",
             "RANDOM weights throughout (no download); timings do not depend on their values.", ""]
    for name, result in report["steps"].items():
        lines.append(f"## {name} ({result.get('seconds', 0):.0f} s)")
        if "error" in result:
            lines += ["", "FAILED: " + result["error"].strip().splitlines()[-1], ""]
            continue
        if name == "segment_batch":
            lines += ["", "| batch | images/s | GPU busy |", "|---|---|---|"]
            for row in result["rows"]:
                busy = "-" if row["gpu_busy"] is None else f"{row['gpu_busy']:.0%}"
                lines.append(f"| {row['batch']} | {row['images_per_s']:.1f} | {busy} |")
            problems = {row["gpu_busy_problem"] for row in result["rows"]} - {None}
            lines += [f"\nGPU busy not sampled: {problem}" for problem in sorted(problems)] + [""]
        else:
            lines += [""] + [f"- {k}: {v}" for k, v in result.items() if k != "seconds"] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--step-timeout", type=int, default=240)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        parser.error("no CUDA device: run with --dry-run to check the steps on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    model = "ViT-Tiny-16-test" if args.dry_run else args.model
    args.batches = [2, 4] if args.dry_run else [16, 32, 64]
    args.repeats = 1 if args.dry_run else 5
    args.photos = 2 if args.dry_run else len(PHOTOS)
    args.decode_repeats = 1 if args.dry_run else 16
    args.pipeline_images = 16 if args.dry_run else 2000
    steps = {
        "cuda_tests": lambda: step_cuda_tests(args),
        "precision": lambda: step_precision(args, model, device),
        "device_vs_cpu": lambda: step_device_vs_cpu(args, model, device),
        "gpu_decode": lambda: step_gpu_decode(args, device),
        "segment_batch": lambda: step_segment_batch(args, model, device),
        "pipeline": lambda: step_pipeline(args, model, device),
        "pipeline_gpu_decode": lambda: step_pipeline(args, model, device, gpu_decode=True),
        "sam3": lambda: step_sam3(args, device),
    }
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
              "python": platform.python_version(), "random_weights": True, "steps": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, run in steps.items():
        start = time.perf_counter()
        try:
            result = run()
        except Exception:  # noqa: BLE001 - one failed step must not hide the others' figures
            result = {"error": traceback.format_exc()}
        result["seconds"] = time.perf_counter() - start
        report["steps"][name] = result
        print(f"{name}: {result['seconds']:.1f} s", "FAILED" if "error" in result else "", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(report))
    print((out / "gpu_check.md").read_text())
    failed = [name for name, result in report["steps"].items() if "error" in result]
    if failed:  # the figures above are still written; CI's dry run fails on a broken step
        sys.exit(f"gpu_check: {len(failed)} step(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
