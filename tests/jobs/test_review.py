"""jobs.review: ranking labelled images for review without ground truth.

The runs here are written row by row, with planted properties: images whose stored labels
are those another method gives with the run's own (tiny, random) model, except for planted
low-confidence, uncertain-area and disagreeing images; and a run of synthetic masks with
classes of known rarity.
"""

from __future__ import annotations

import csv
import io
import json
import uuid

import numpy as np
import pytest

from jobs import _cli, review
from jobs._cli import open_run
from jobs.review import ReviewOptions, rare_class_order, review_run
from tests.pipeline.conftest import VOCAB, fresh_s3fs, s3_options

from .conftest import run_job
from .review_support import photo_crops, tiny_segmentor, write_run

COMPARE = "naclip"
NAMES = VOCAB.names  # person, cat, coffee cup, rocket, background
K = len(NAMES)
PLANTED = {"low_a", "low_b", "patchy", "dis_a", "dis_b"}
SECRET = "fake-s3cr3t-review-91c2"


def _without_created(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "created"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """12 images. Stored labels = naclip's labels on the run's model (so they agree with the
    disagreement strategy's re-segmentation) with confidence 0.9, except:

    * ``low_a``, ``low_b``: confidence 0.1 everywhere (lowest mean, all pixels uncertain);
    * ``patchy``: 0.45 on 60% of the pixels, 0.85 elsewhere (mean 0.61, 60% uncertain);
    * ``dis_a``, ``dis_b``: confident (0.9) but every label shifted by one: 100% disagreement.
    """
    keys = ["low_a", "n0", "dis_a", "n1", "patchy", "n2", "n3", "low_b", "n4", "dis_b", "n5", "n6"]
    pictures = dict(zip(keys, photo_crops(len(keys))))
    other = tiny_segmentor(COMPARE)
    vocab = other.vocabulary(VOCAB.classes, VOCAB.background)
    results = other.segment_batch([pictures[k] for k in keys], vocab)
    images = {}
    for key, result in zip(keys, results):
        labels = result.labels.astype(np.uint8)
        confidence = np.full(labels.shape, 0.9, np.float32)
        if key.startswith("low"):
            confidence[:] = 0.1
        elif key == "patchy":
            confidence[:] = 0.85
            confidence.reshape(-1)[: int(0.6 * confidence.size)] = 0.45
        elif key.startswith("dis"):
            labels = ((labels.astype(np.int64) + 1) % K).astype(np.uint8)
        images[key] = (pictures[key], labels, confidence)
    root = tmp_path_factory.mktemp("planted")
    return write_run(root, images)


@pytest.fixture(scope="module")
def planted_doc(planted) -> dict:
    run = open_run(planted["output"])
    options = ReviewOptions(
        n=6,
        seed=0,
        strategies=("low-confidence", "uncertain-area", "disagreement"),
        compare_method=COMPARE,
    )
    return review_run(run, options)


def _keys(doc: dict) -> list[str]:
    return [e["image_id"].split("/", 1)[1] for e in doc["selected"]]


def test_planted_low_confidence_and_disagreeing_images_are_selected_first(planted_doc):
    keys = _keys(planted_doc)
    assert len(keys) == 6 and PLANTED <= set(keys), keys
    by_key = dict(zip(keys, planted_doc["selected"]))
    # turns: low-confidence, uncertain-area, disagreement, low-confidence, ...
    assert {keys[0], keys[1]} == {"low_a", "low_b"}
    assert keys[2] in {"dis_a", "dis_b"} and by_key[keys[2]]["chosen_by"] == "disagreement"
    assert keys[3] == "patchy" and by_key["patchy"]["chosen_by"] == "low-confidence"
    assert by_key["low_a"]["mean_confidence"] == pytest.approx(0.1, abs=0.003)
    assert by_key["patchy"]["low_confidence_share"] == pytest.approx(0.6, abs=0.01)
    for key in ("dis_a", "dis_b"):
        assert by_key[key]["disagreement"] == pytest.approx(1.0)
        assert "labelled otherwise by naclip" in by_key[key]["reason"]


def test_disagreement_uses_the_runs_own_model_and_weights(planted_doc):
    # Every image was re-segmented (12 <= the default candidate count); the ones stored
    # with naclip's labels agree with the re-segmentation (the run's seed-0 tiny model).
    assert planted_doc["options"]["candidates_compared"] == 12
    for entry in planted_doc["selected"]:
        key = entry["image_id"].split("/", 1)[1]
        if not key.startswith("dis"):
            assert entry["disagreement"] <= 0.02, (key, entry["disagreement"])
        assert set(entry["scores"]) == {
            "low-confidence",
            "uncertain-area",
            "disagreement",
            "rare-class",
        }


def test_selection_names_its_provenance_and_options(planted_doc, planted):
    doc = planted_doc
    assert doc["config_hash"] == planted["config_hash"]
    assert doc["model"] == "ViT-Tiny-16-test" and doc["weights_identity"] == "random-init:seed=0"
    assert doc["random_weights"] is True and doc["note"] == _cli.RANDOM_WEIGHTS_BANNER
    assert doc["counts"] == {"rows": 12, "ok": 12, "error": 0, "selected": 6}
    assert doc["options"]["compare_method"] == COMPARE and doc["options"]["seed"] == 0
    assert [e["rank"] for e in doc["selected"]] == list(range(1, 7))


def test_same_seed_same_selection_and_seeds_change_only_ties(planted):
    run = open_run(planted["output"])
    cheap = ("low-confidence", "uncertain-area", "random")
    first = review_run(run, ReviewOptions(n=12, seed=7, strategies=cheap))
    again = review_run(run, ReviewOptions(n=12, seed=7, strategies=cheap))
    assert _without_created(first) == _without_created(again)
    other = review_run(run, ReviewOptions(n=12, seed=8, strategies=cheap))
    assert _keys(other) != _keys(first)  # the random turns and the ties moved ...
    assert set(_keys(other)[:2]) == set(_keys(first)[:2]) == {"low_a", "low_b"}  # ... not these


def test_only_the_candidates_are_re_segmented(planted):
    run = open_run(planted["output"])
    options = ReviewOptions(
        n=12,
        strategies=("low-confidence", "disagreement"),
        compare_method=COMPARE,
        candidates=3,
    )
    doc = review_run(run, options)
    scored = [e for e in doc["selected"] if e["disagreement"] is not None]
    assert len(scored) == 3 and doc["options"]["candidates_compared"] == 3
    # the candidates: the least confident, the most uncertain area, a random one
    assert {"low_a", "low_b"} <= {e["image_id"].split("/", 1)[1] for e in scored}


@pytest.fixture(scope="module")
def rare(tmp_path_factory) -> dict:
    """8 images, all cat (60%) + background; 'coffee cup' in 3 of them, 'person' and
    'rocket' in one each: the rarest classes."""
    pictures = photo_crops(8, (40, 30))
    images = {}
    for i, picture in enumerate(pictures):
        labels = np.full((30, 40), NAMES.index("background"), np.uint8)
        labels[:, :24] = NAMES.index("cat")
        if i in (1, 4, 6):
            labels[:, 24:34] = NAMES.index("coffee cup")  # 25%
        if i == 2:
            labels[:, 28:] = NAMES.index("rocket")  # 30%
        if i == 5:
            labels[:, 32:] = NAMES.index("person")  # 20%
        confidence = np.full(labels.shape, 0.8 - 0.05 * i, np.float32)
        images[f"img{i}"] = (picture, labels, confidence)
    return write_run(tmp_path_factory.mktemp("rare"), images, config_hash="0123456789ab")


def test_rare_classes_are_stratified_rarest_first(rare):
    run = open_run(rare["output"])
    doc = review_run(run, ReviewOptions(n=5, strategies=("rare-class",)))
    reasons = [e["reason"] for e in doc["selected"]]
    keys = _keys(doc)
    assert keys[:2] == ["img5", "img2"]  # person and rocket: 1 image each (ties: label order)
    assert "rare class 'person' (in 1 of 8 images)" in reasons[0]
    assert "rare class 'rocket'" in reasons[1]
    assert "rare class 'coffee cup' (in 3 of 8 images)" in reasons[2]
    # 5 picks, 5 classes present: every class got one
    for name in NAMES:
        assert sum(f"rare class '{name}'" in r for r in reasons) == 1, (name, reasons)
    assert doc["selected"][0]["scores"]["rare-class"] == pytest.approx(1 - 1 / 8)


def test_rare_class_order_gives_every_class_turns():
    from jobs.review import ImageScore

    def image(i, ids, shares):
        return ImageScore(f"s/{i}", "s", "u", 10, 10, False, 0.5, 0.0, ids, shares, i)

    images = [
        image(0, (0, 1), (0.9, 0.1)),
        image(1, (0, 2), (0.5, 0.5)),
        image(2, (0, 2), (0.8, 0.2)),
        image(3, (0,), (1.0,)),
    ]
    order, why = rare_class_order(images, ["a", "b", "c"])
    assert order == [0, 1, 3, 2]  # b (1 image), c (2: largest share first), a, then c again
    assert "rare class 'b'" in why[0] and "rare class 'a'" in why[3]


def test_default_strategies_take_turns_and_fill_n(rare):
    run = open_run(rare["output"])
    options = ReviewOptions(
        n=4,
        strategies=("low-confidence", "uncertain-area", "rare-class"),
        confidence_threshold=0.52,
    )
    doc = review_run(run, options)
    assert [e["chosen_by"] for e in doc["selected"]] == [
        "low-confidence",
        "uncertain-area",
        "rare-class",
        "low-confidence",
    ]
    assert _keys(doc)[:2] == ["img7", "img6"]  # confidence 0.45, then 0.50 (< 0.52 too)
    assert len(set(_keys(doc))) == 4


def test_cli_writes_selection_beside_the_run_and_exports_it(planted):
    proc = run_job(
        "jobs.review",
        "--labels",
        planted["output"],
        "-n",
        "4",
        "--seed",
        "3",
        "--strategies",
        "low-confidence,disagreement",
        "--compare-method",
        COMPARE,
        "--format",
        "labelstudio",
        "--no-progress",
    )
    review_dir = planted["layout"].root + "/_review"
    doc = json.load(open(f"{review_dir}/selection.json"))
    assert [e["chosen_by"] for e in doc["selected"]] == [
        "low-confidence",
        "disagreement",
        "low-confidence",
        "disagreement",
    ]
    assert {e["image_id"].split("/", 1)[1] for e in doc["selected"]} == {
        "low_a",
        "low_b",
        "dis_a",
        "dis_b",
    }
    table = list(csv.DictReader(io.StringIO(open(f"{review_dir}/selection.csv").read())))
    assert [r["image_id"] for r in table] == [e["image_id"] for e in doc["selected"]]
    assert float(table[1]["disagreement"]) == pytest.approx(1.0)
    tasks = json.load(open(f"{review_dir}/labelstudio/tasks.json"))
    assert [t["data"]["image_id"] for t in tasks] == [e["image_id"] for e in doc["selected"]]
    assert _cli.RANDOM_WEIGHTS_BANNER in proc.stdout and "selected 4 of 12" in proc.stdout
    # the re-segmentation's size and cost are said before it starts
    assert f"disagreement: re-segmenting 12 of 12 images with {COMPARE} (--compare-budget)" in (
        proc.stderr
    )
    assert "open_clip" not in proc.stderr  # no model-build chatter at INFO


def test_the_default_strategies_read_only_the_rows():
    from jobs.review import DEFAULT_STRATEGIES, build_parser

    assert "disagreement" not in DEFAULT_STRATEGIES
    args = build_parser().parse_args(["--labels", "x", "-n", "3", "--compare-budget", "5"])
    assert args.strategies == "low-confidence,uncertain-area,rare-class" and args.candidates == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["-n", "0"], "-n must be a positive number"),
        (["-n", "-3"], "-n must be a positive number"),
        (["-n", "2", "--strategies", "loudest"], "unknown strategy"),
        (["-n", "2", "--confidence-threshold", "1.5"], "--confidence-threshold"),
        (["-n", "2", "--compare-method", "nope"], "unknown --compare-method"),
        (["-n", "2", "--format", "coco"], "unknown --format"),
    ],
)
def test_cli_rejects_bad_arguments_with_a_clear_error(rare, args, message, capsys):
    assert review.main(["--labels", rare["output"], *args]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err


def test_empty_missing_and_all_error_runs_are_clear_errors(tmp_path, capsys):
    from pipeline.layout import RunLayout
    from pipeline.sink import error_row, write_shard

    RunLayout.open(str(tmp_path / "empty"), "aaaaaaaaaaaa").makedirs()
    assert review.main(["--labels", str(tmp_path / "empty"), "-n", "3"]) == 2
    assert "no committed shards" in capsys.readouterr().err
    assert review.main(["--labels", str(tmp_path / "missing"), "-n", "3"]) == 2
    assert "error: no labelling run under" in capsys.readouterr().err
    broken = RunLayout.open(str(tmp_path / "broken"), "bbbbbbbbbbbb")
    broken.makedirs()
    rows = [
        error_row(image_id=f"s/{i}", shard_id="s", key=str(i), source_uri="x", error="bad")
        for i in range(3)
    ]
    write_shard(broken, "s", rows, {"names": ["a"], "config_hash": "bbbbbbbbbbbb"})
    assert (
        review.main(["--labels", str(tmp_path / "broken"), "-n", "2", "--strategies", "random"])
        == 2
    )
    assert "no labelled images" in capsys.readouterr().err
    with pytest.raises(_cli.CliError, match="no labelled images.*all 3 rows are errors"):
        review.review(str(tmp_path / "broken"), ReviewOptions(n=2, strategies=("random",)))


def test_review_reads_and_writes_s3(s3_endpoint, planted):
    options = s3_options(s3_endpoint, SECRET)
    fs = fresh_s3fs(options)
    bucket = f"review-labels-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.put(planted["output"] + "/", f"{bucket}/run/", recursive=True)
    fs.invalidate_cache()
    proc = run_job(
        "jobs.review",
        "--labels",
        f"s3://{bucket}/run",
        "-n",
        "3",
        "--strategies",
        "uncertain-area,disagreement",
        "--compare-method",
        COMPARE,
        "--storage-options",
        json.dumps(options),
        "--no-progress",
    )
    fs.invalidate_cache()
    key = f"{bucket}/run/{planted['config_hash']}/_review/selection.json"
    doc = json.loads(fs.cat_file(key))
    assert doc["labels"].startswith(f"s3://{bucket}/run/")
    assert [e["chosen_by"] for e in doc["selected"]] == [
        "uncertain-area",
        "disagreement",
        "uncertain-area",
    ]
    assert _keys(doc)[1] in {"dis_a", "dis_b"}
    assert fs.exists(key.replace(".json", ".csv"))
    for text in (proc.stdout, proc.stderr, json.dumps(doc)):
        assert SECRET not in text
