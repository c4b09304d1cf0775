"""jobs.evaluate end to end (as users run it) and the dataset layouts it reads."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from cliptrase.metrics import ConfusionMatrix
from jobs import evaluate
from jobs.datasets import Sample, get_layout, read_gt

REPO = Path(__file__).resolve().parents[2]
CLASSES = "sky,person,ground"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
TINY_MODEL = "--model ViT-Tiny-16-test --random-weights --device cpu"


def _png(array: np.ndarray, path: Path, palette: bool = False) -> None:
    """An 8-bit label PNG; ``palette``: a palette ("P") image like VOC's SegmentationClass."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if palette:
        img = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    else:
        img = Image.fromarray(array)
    img.save(path)


def _synthetic_gt(shape, seed: int) -> np.ndarray:
    """Horizontal bands of the 3 classes with an ignored border, like real annotations."""
    h, w = shape
    gt = np.zeros((h, w), np.uint8)
    gt[h // 3 : 2 * h // 3] = 1
    gt[2 * h // 3 :] = 2
    gt[:, :2] = 255
    rng = np.random.default_rng(seed)
    gt[rng.random((h, w)) < 0.03] = 255
    return gt


def _perturbed(gt: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(100 + seed)
    pred = np.where(gt == 255, 0, gt).astype(np.uint8)
    flip = rng.random(gt.shape) < 0.25
    pred[flip] = rng.integers(0, 3, size=int(flip.sum()))
    return pred


@pytest.fixture(scope="module")
def generic(tmp_path_factory):
    """images/ + masks/ + predictions/ of four small scikit-image photos; the direct matrix."""
    root = tmp_path_factory.mktemp("generic")
    expected = ConfusionMatrix(3)
    for seed, name in enumerate(PHOTOS):
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        photo = photo.resize((48 + 8 * seed, 40))
        (root / "images").mkdir(exist_ok=True)
        photo.save(root / "images" / f"{name}.jpg")
        gt = _synthetic_gt((photo.height, photo.width), seed)
        pred = _perturbed(gt, seed)
        _png(gt, root / "masks" / f"{name}.png")
        _png(pred, root / "predictions" / f"{name}.png")
        expected.update(pred, gt)
    return root, expected


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--no-progress", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _assert_report_matches(report: dict, expected: ConfusionMatrix) -> None:
    summary = report["summary"]
    assert summary["mIoU"] == pytest.approx(expected.miou())
    assert summary["aAcc"] == pytest.approx(expected.pixel_accuracy())
    assert summary["mAcc"] == pytest.approx(expected.mean_accuracy())
    assert summary["pixels"] == int(expected.area_gt.sum())
    assert report["confusion_matrix"] == expected.matrix.tolist()
    ious = [row["iou"] for row in report["per_class"]]
    for got, want in zip(ious, expected.iou()):
        assert (got is None and math.isnan(want)) or got == pytest.approx(want)


def test_scores_local_predictions_exactly_as_the_direct_computation(generic, tmp_path):
    root, expected = generic
    out = tmp_path / "out"
    proc = _run(
        *f"--dataset generic --root {root} --classes {CLASSES}".split(),
        *f"--predictions {root / 'predictions'} --out {out}".split(),
    )
    report = json.loads((out / "metrics.json").read_text())
    _assert_report_matches(report, expected)
    assert report["images"] == 4 and report["classes"] == ["sky", "person", "ground"]
    assert report["random_weights"] is False
    rows = list(csv.DictReader(io.StringIO((out / "per_class.csv").read_text())))
    assert [r["name"] for r in rows] == ["sky", "person", "ground"]
    assert float(rows[1]["iou"]) == pytest.approx(expected.iou()[1])
    assert f"| {100 * expected.miou():.2f} |" in proc.stdout  # the markdown summary
    assert "| 1 | person |" in proc.stdout


def test_scores_predictions_read_from_s3_and_writes_the_report_to_s3(generic, s3_endpoint):
    import s3fs

    root, expected = generic
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("bench")
    fs.put(str(root), "bench/generic", recursive=True)
    _run(
        *f"--dataset generic --root s3://bench/generic --classes {CLASSES}".split(),
        *"--predictions s3://bench/generic/predictions --out s3://bench/eval".split(),
        *["--storage-options", json.dumps(options)],
    )
    report = json.loads(fs.cat_file("bench/eval/metrics.json"))
    _assert_report_matches(report, expected)
    assert "endpoint_url" not in json.dumps(report)  # storage options never reach outputs
    assert fs.exists("bench/eval/per_class.csv")


def test_an_unreadable_bucket_is_a_user_error(s3_endpoint, tmp_path, capsys):
    options = json.dumps({"client_kwargs": {"endpoint_url": s3_endpoint}})
    code = evaluate.main(
        [
            *f"--dataset generic --root s3://no-such-bucket/x --classes {CLASSES}".split(),
            *f"--predictions s3://no-such-bucket/p --out {tmp_path}".split(),
            *["--storage-options", options],
        ]
    )
    assert code == 2
    assert "dataset root s3://no-such-bucket/x does not exist" in capsys.readouterr().err


def test_run_mode_segments_with_random_weights_and_says_so(generic, tmp_path):
    root, _ = generic
    out = tmp_path / "run"
    proc = _run(
        *f"--dataset generic --root {root} --classes {CLASSES} --run {TINY_MODEL}".split(),
        *f"--short-side 32 --batch-size 2 --limit 3 --save-predictions --out {out}".split(),
    )
    assert "RANDOM weights" in proc.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["random_weights"] is True and "RANDOM weights" in report["note"]
    assert report["mode"] == "run" and report["images"] == 3
    assert report["model"] == "ViT-Tiny-16-test"
    assert "RANDOM weights" in (out / "metrics.md").read_text()
    # The score is the score of the masks it saved.
    direct = ConfusionMatrix(3)
    for name in sorted(PHOTOS)[:3]:
        pred = np.array(Image.open(out / "predictions" / f"{name}.png"))
        direct.update(pred, np.array(Image.open(root / "masks" / f"{name}.png")))
    _assert_report_matches(report, direct)


def test_bad_input_exits_2_with_a_message_and_no_traceback(generic, tmp_path):
    root, _ = generic
    proc = _run(
        *f"--dataset generic --root {root} --class-file {tmp_path / 'no.yaml'}".split(),
        *f"--predictions {root / 'predictions'} --out {tmp_path / 'o'}".split(),
        check=False,
    )
    assert proc.returncode == 2
    assert "class file not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--classes", " , "], "--classes is empty"),
        (["--classes", "a,b,a"], "'a' appears more than once"),
        (["--classes", CLASSES, "--storage-options", '{"key": "SECRET'], "not valid JSON"),
        (["--classes", CLASSES, "--storage-options", "[1]"], "must be a JSON object"),
        ([], "has no class list"),
        (["--background", "sky"], "--background needs classes"),
    ],
)
def test_vocabulary_and_storage_mistakes_are_user_errors(generic, tmp_path, capsys, extra, message):
    root, _ = generic
    code = evaluate.main(
        [
            *f"--dataset generic --root {root} --predictions {root / 'predictions'}".split(),
            *f"--out {tmp_path / 'o'} --no-progress".split(),
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "SECRET" not in err


def test_missing_or_misshapen_predictions_are_user_errors(generic, tmp_path, capsys):
    root, _ = generic
    preds = tmp_path / "preds"
    _png(np.zeros((5, 5), np.uint8), preds / "astronaut.png")
    args = f"--dataset generic --root {root} --classes {CLASSES} --out {tmp_path / 'o'}".split()
    assert evaluate.main([*args, "--no-progress", "--predictions", str(preds)]) == 2
    assert "3 of 4 images have no prediction" in capsys.readouterr().err
    assert evaluate.main([*args, "--predictions", str(preds), "--limit", "1"]) == 2
    assert "predictions must be at the GT's resolution" in capsys.readouterr().err


def test_run_scores_synonyms_of_a_preset(generic, tmp_path, capsys):
    root, _ = generic
    out = tmp_path / "o"
    code = evaluate.main(
        [
            *f"--dataset generic --root {root} --preset voc20 --run {TINY_MODEL}".split(),
            *f"--short-side 32 --out {out} --no-progress --limit 1".split(),
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "metrics.json").read_text())
    assert len(report["classes"]) == 20 and report["images"] == 1


def test_method_comparison_writes_one_row_per_method_from_its_own_report(generic, tmp_path):
    root, _ = generic
    out = tmp_path / "cmp"
    code = evaluate.main(
        [
            *f"--dataset generic --root {root} --classes {CLASSES} --run {TINY_MODEL}".split(),
            *f"--method cliptrase,sclip --short-side 32 --limit 2 --out {out}".split(),
            "--no-progress",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO((out / "comparison.csv").read_text())))
    assert [r["method"] for r in rows] == ["cliptrase", "sclip"]
    for row in rows:
        report = json.loads((out / row["method"] / "metrics.json").read_text())
        assert report["method"] == row["method"] and report["images"] == 2
        assert float(row["mIoU"]) == pytest.approx(report["summary"]["mIoU"])
    assert rows[1]["protocol"].startswith("slide")  # SCLIP's published sliding window
    assert "| cliptrase |" in (out / "comparison.md").read_text()


def test_method_all_runs_every_preset(generic, tmp_path):
    """``--method all`` is every name in cliptrase.METHOD_NAMES (SC-CLIP, SFP, DIH-CLIP and
    both ResCLIPs included), each with its own report."""
    from cliptrase import METHOD_NAMES

    assert {"scclip", "sfp", "dihclip", "resclip", "resclip_sclip"} <= set(METHOD_NAMES)
    assert evaluate._method_names("all") == list(METHOD_NAMES)
    root, _ = generic
    out = tmp_path / "all"
    code = evaluate.main(
        [
            *f"--dataset generic --root {root} --classes {CLASSES} --run {TINY_MODEL}".split(),
            *f"--method all --short-side 32 --limit 1 --out {out} --no-progress".split(),
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO((out / "comparison.csv").read_text())))
    assert [r["method"] for r in rows] == list(METHOD_NAMES)
    for name in METHOD_NAMES:
        assert json.loads((out / name / "metrics.json").read_text())["method"] == name


def test_unknown_method_is_a_user_error(generic, tmp_path, capsys):
    root, _ = generic
    args = f"--dataset generic --root {root} --classes {CLASSES} --run {TINY_MODEL}".split()
    assert evaluate.main([*args, "--method", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown --method" in capsys.readouterr().err


# ------------------------------------------------------------------- layouts
@pytest.fixture
def voc_root(tmp_path):
    """A VOCdevkit/VOC2012 with two val images (palette GT: 0 background, 255 border)."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    gts = {}
    for i, key in enumerate(["2007_000032", "2007_000033"]):
        image = skimage.data.astronaut()[: 20 + i, :30]
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "JPEGImages" / f"{key}.jpg")
        gt = np.zeros(image.shape[:2], np.uint8)
        gt[5:10, 5:10] = 15  # person
        gt[10:15, 10:20] = 1  # aeroplane
        gt[:, 0] = 255
        _png(gt, root / "SegmentationClass" / f"{key}.png", palette=True)
        gts[key] = gt
    split = root / "ImageSets" / "Segmentation"
    split.mkdir(parents=True)
    (split / "val.txt").write_text("2007_000032\n2007_000033\n")
    (root / "JPEGImages" / "2007_999999.jpg").write_bytes(b"")  # not in val: never listed
    return root, gts


def test_voc_layout_lists_the_val_split_and_moves_background_last(voc_root):
    root, gts = voc_root
    layout = get_layout("voc")
    samples = layout.samples(str(root))
    assert [s.key for s in samples] == ["2007_000032", "2007_000033"]
    assert samples[0].image_uri.endswith("JPEGImages/2007_000032.jpg")
    assert samples[0].gt_uri.endswith("SegmentationClass/2007_000032.png")
    classes = layout.class_list()
    assert classes.num_labels == 21 and classes.label_names[-1] == "background"
    gt = read_gt(layout, samples[0], classes.num_labels)
    raw = gts["2007_000032"]
    assert (gt[raw == 0] == 20).all()  # background: last label
    assert (gt[raw == 15] == 14).all() and classes.label_names[14] == "person"
    assert (gt[raw == 1] == 0).all() and classes.label_names[0] == "aeroplane"
    assert (gt[raw == 255] == 255).all()


def test_voc20_ignores_background(voc_root):
    root, gts = voc_root
    layout = get_layout("voc20")
    sample = layout.samples(str(root))[0]
    gt = read_gt(layout, sample, 20)
    raw = gts["2007_000032"]
    assert (gt[raw == 0] == 255).all() and (gt[raw == 15] == 14).all()


def test_voc_predictions_in_label_order_score_perfectly(voc_root, tmp_path, capsys):
    root, gts = voc_root
    layout = get_layout("voc21")
    preds = tmp_path / "preds"
    for sample in layout.samples(str(root)):
        gt = read_gt(layout, sample, 21)
        _png(np.where(gt == 255, 3, gt), preds / f"{sample.key}.png")
    out = tmp_path / "out"
    code = evaluate.main(
        ["--dataset", "voc", "--root", str(root), "--predictions", str(preds), "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "metrics.json").read_text())
    assert report["summary"]["mIoU"] == 1.0 and report["summary"]["aAcc"] == 1.0
    names = [r["name"] for r in report["per_class"] if r["iou"] is not None]
    assert names == ["aeroplane", "person", "background"]


def test_folder_layouts_pair_files_by_their_benchmark_names(tmp_path):
    def touch(path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    ade = tmp_path / "ADEChallengeData2016"
    touch(ade / "images/validation/ADE_val_00000001.jpg")
    touch(ade / "annotations/validation/ADE_val_00000001.png")
    city = tmp_path / "cityscapes"
    touch(city / "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png")
    touch(city / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png")
    touch(city / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_color.png")
    coco = tmp_path / "coco_stuff164k"
    touch(coco / "images/val2017/000000000139.jpg")
    touch(coco / "annotations/val2017/000000000139_labelTrainIds.png")

    [s] = get_layout("ade20k").samples(str(ade))
    assert s.key == "ADE_val_00000001" and s.gt_uri.endswith("validation/ADE_val_00000001.png")
    [s] = get_layout("cityscapes").samples(str(city))
    assert s.key == "frankfurt/frankfurt_000000_000294"
    assert s.gt_uri.endswith("frankfurt_000000_000294_gtFine_labelTrainIds.png")
    [s] = get_layout("coco_stuff").samples(str(coco))
    assert s.gt_uri.endswith("000000000139_labelTrainIds.png")
    assert get_layout("coco_stuff").class_list().num_labels == 171


def test_ade20k_reduces_the_zero_label(tmp_path):
    raw = np.array([[0, 1, 150, 255]], np.uint8)
    _png(raw, tmp_path / "a.png")
    sample = Sample("a", "", str(tmp_path / "a.png"))
    assert read_gt(get_layout("ade20k"), sample, 150).tolist() == [[255, 0, 149, 255]]


def test_folder_layout_reports_images_without_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="1 of 1 images have no GT mask"):
        get_layout("generic").samples(str(tmp_path))


def test_a_benchmark_refuses_a_class_list_of_another_size(voc_root, tmp_path, capsys):
    root, _ = voc_root
    code = evaluate.main(
        f"--dataset voc20 --root {root} --classes a,b --predictions {tmp_path} "
        f"--out {tmp_path / 'o'}".split()
    )
    assert code == 2
    assert "has 20 labels (without background) but the class list given has 2" in (
        capsys.readouterr().err
    )


def test_a_sam3_method_is_scored_under_its_papers_protocol(voc_root, tmp_path):
    """VOC21 with SegEarth-OV3's own class list (its names; 'background' is a prompt whose
    label is background) and SegEarth's VOC21 settings, whole images squashed to the square."""
    from cliptrase.sam3.methods import method_for_dataset

    root, _ = voc_root
    out = tmp_path / "sam3"
    code = evaluate.main(
        [
            *f"--dataset voc --root {root} --run --model sam3-tiny --random-weights".split(),
            *f"--method segearthov3 --out {out} --no-progress".split(),
        ]
    )
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert (report["method"], report["model"], report["images"]) == ("segearthov3", "sam3-tiny", 2)
    assert report["protocol"] == {"mode": "squash", "short_side": 168, "crop": None, "stride": None}
    assert report["classes"][3] == "ship" and report["classes"][-1] == "background"
    assert len(report["classes"]) == 21
    voc = method_for_dataset("segearthov3", "voc21")
    assert (voc.confidence_threshold, voc.prob_thd) == (0.5, 0.4)
