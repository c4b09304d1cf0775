"""Labels decided at the original size (SegmentorConfig.resolution="original", the default).

References upsample the processing-resolution scores to the original size with
``F.interpolate`` in one piece and decide there, as the official SCLIP / NACLIP / ClearCLIP
code does; the product does it in strips, touching the full ``K`` logits only at boundaries.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

import cliptrase
from cliptrase import fullsize, inference, resample
from cliptrase.head import decide
from cliptrase.inference import whole_tile
from cliptrase.launches import count_dispatch, device_branches
from cliptrase.resample import LinearAxis, stretched

from .conftest import DEVICES, on_device
from .test_methods import _ref_slide_logits

FIXTURE = Path(__file__).parent / "data" / "cliptrase_original_expected.npz"
VOCAB = (["person", "rocket", "cat", "grass"], ["background", "wall", "sky"])
SIZES = [(21, 336), (336, 1080), (37, 597), (597, 1920), (448, 3000), (50, 30), (5, 5), (1, 4)]


def aten_weights(source: int, target: int) -> torch.Tensor:
    """``(source, target)``: the weight ATen's bilinear resize gives source index i at output j."""
    eye = torch.eye(source)[None, :, :, None].contiguous()
    return F.interpolate(eye, size=(target, 1), mode="bilinear", align_corners=False)[0, :, :, 0]


@pytest.mark.parametrize("source,target", SIZES)
def test_taps_are_atens_exactly(source, target):
    axis = LinearAxis.build(source, target)
    ours = torch.zeros(source, target)
    ours[axis.lo, torch.arange(target)] += axis.w_lo
    ours[axis.hi, torch.arange(target)] += axis.w_hi
    assert torch.equal(ours, aten_weights(source, target))


def test_stretched_equals_f_interpolate_to_rounding():
    torch.manual_seed(0)
    for (h, big_h), (w, big_w) in zip(SIZES, reversed(SIZES)):
        x = torch.randn(2, 3, h, w)
        expected = F.interpolate(x, size=(big_h, big_w), mode="bilinear", align_corners=False)
        got = stretched(x, LinearAxis.build(h, big_h), LinearAxis.build(w, big_w))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def stretched_argmax(scores: torch.Tensor, rows: LinearAxis, cols: LinearAxis) -> torch.Tensor:
    """The product's full-size first maximum (:class:`fullsize.Choice`, identity lookup)."""
    window = fullsize.OutputWindow(rows, cols, slice(0, len(rows)), slice(0, len(cols)))
    channels = torch.arange(scores.shape[0], device=scores.device)
    return fullsize.Choice.of(scores, channels).full(window).long()


def _smooth_scores(k: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Scores with regions and boundaries, like upsampled logits."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, k, max(2, h // 8), max(2, w // 8), generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strip_elements", [resample.STRIP_ELEMENTS, 997])
def test_stretched_argmax_equals_the_dense_argmax_in_any_strips(
    monkeypatch, strip_elements, device
):
    monkeypatch.setattr(resample, "STRIP_ELEMENTS", strip_elements)
    for seed, (k, h, w, big_h, big_w) in enumerate(
        [(6, 84, 112, 300, 451), (3, 336, 505, 512, 777), (150, 40, 60, 97, 131)]
    ):
        scores = _smooth_scores(k, h, w, seed)
        dense = F.interpolate(scores[None], size=(big_h, big_w), mode="bilinear")[0]
        expected = dense.max(dim=0).indices
        got = stretched_argmax(
            scores.to(device), LinearAxis.build(h, big_h, device), LinearAxis.build(w, big_w, device)
        ).cpu()
        assert got.shape == (big_h, big_w)
        # Equal up to rounding-level ties between two rows (none seen on these inputs).
        assert (got != expected).float().mean() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strip_elements", [resample.STRIP_ELEMENTS, 61])
@pytest.mark.parametrize(
    "k,h,w,big_h,big_w",
    [
        (6, 84, 112, 300, 451),  # upsampled ~3.6x: bands of 3-4 rows, taller at the edges
        (4, 7, 9, 100, 13),  # bands of ~14 rows cut into pieces; columns downsampled
        (5, 40, 60, 37, 29),  # downsampled both ways: one row per band, source rows skipped
        (3, 1, 6, 5, 17),  # one source row: every output row in one band
        (20, 30, 30, 30, 30),  # same size: the identity taps
    ],
)
def test_boundary_pixels_get_exactly_the_dense_strips_channel(
    monkeypatch, strip_elements, device, k, h, w, big_h, big_w
):
    """Per (band, column) pair and broadcast over the band's rows, the same float operations
    as ``stretched``: the same first maximum at every pixel, not merely close."""
    monkeypatch.setattr(resample, "STRIP_ELEMENTS", strip_elements)
    scores = _smooth_scores(k, h, w, seed=big_h).to(device)
    rows, cols = LinearAxis.build(h, big_h, device), LinearAxis.build(w, big_w, device)
    dense = stretched(scores, rows, cols).max(dim=0).indices
    assert torch.equal(stretched_argmax(scores, rows, cols), dense)
    # The same through a window that owns only part of the output.
    part_rows, part_cols = rows.part(big_h // 3, big_h), cols.part(1, big_w)
    dense_part = stretched(scores, part_rows, part_cols).max(dim=0).indices
    assert torch.equal(stretched_argmax(scores, part_rows, part_cols), dense_part)
    # Counted without the full map: every pixel once, boundary pixels one by one.
    window = fullsize.OutputWindow(rows, cols, slice(0, big_h), slice(0, big_w))
    choice = fullsize.Choice.of(scores, torch.arange(k, device=device))
    assert torch.equal(choice.full(window).long(), dense)
    assert torch.equal(choice.counts(window, k), torch.bincount(dense.reshape(-1), minlength=k))


def test_most_pixels_never_touch_their_logits(tiny, astronaut):
    """The corner test decides every interior pixel: the full vector is read at boundaries only."""
    seg = tiny.variant(method="sclip")
    vocab = seg.vocabulary(["person", "rocket", "flag", "grass"], ["background", "sky"])
    prepared = seg.prepare(astronaut)
    scores = seg._process(prepared.pixels[None], vocab).logits[0]
    top = scores.max(dim=0).indices
    rows, cols = LinearAxis.build(336, 1080), LinearAxis.build(336, 1080)
    corners = torch.stack(
        [top[rows.lo][:, cols.lo], top[rows.lo][:, cols.hi], top[rows.hi][:, cols.lo],
         top[rows.hi][:, cols.hi]]
    )
    boundary = (corners.amin(0) != corners.amax(0)).float().mean()
    assert 0 < boundary < 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sclip", "clearclip", "naclip"])
def test_slide_methods_decide_at_the_original_size_as_the_official_code(
    tiny, chelsea, name, device
):
    """Crop logits averaged at the processing size, upsampled to the original, PAMR there
    (NACLIP's, on the normalised image upsampled alike), then the head."""
    seg = tiny.variant(method=name)
    vocab = seg.vocabulary(["cat", "grass", "floor"], ["background", "wall"])
    prepared = seg.prepare(chelsea)  # 300 x 451 -> 336 x 505
    h, w = prepared.resized
    _, _, crop, stride = seg.protocol()
    image = prepared.pixels[None, :, :h, :w]
    logits = _ref_slide_logits(seg, image, vocab, crop, stride, seg.logit_scale_used)
    logits = F.interpolate(logits, size=chelsea.shape[:2], mode="bilinear")
    if seg.method.pamr is not None:
        image = F.interpolate(image, size=chelsea.shape[:2], mode="bilinear")
        logits = seg.method.pamr(image, logits)
    expected = decide(
        logits, vocab.row_labels, vocab.num_labels, vocab.background_label, seg.method.head
    )[0].numpy()
    result = on_device(seg, device).segment(chelsea, vocab)
    assert result.labels.shape == chelsea.shape[:2]
    assert (result.labels == expected).mean() > 0.9999
    legacy = seg.variant(config=cliptrase.SegmentorConfig(resolution="processing"))
    assert (legacy.segment(chelsea, vocab).labels != expected).any()  # the change is real


def _vote_case(k, n, h, w, seed, bias, device, rough=False):
    """Scores (``k`` rows, two rows per label: synonyms) and ``n`` cluster maps at ``h x w``.
    ``bias``: how strongly each region's own label leads inside it (0: every label contested);
    ``rough``: scores that change from pixel to pixel, so most cells' corners disagree."""
    maps = _smooth_scores(n, h, w, seed=seed)
    region = maps.max(dim=0).indices
    own = F.one_hot((2 * region) % k, k).permute(2, 0, 1).float()
    if rough:
        noise = torch.randn(k, h, w, generator=torch.Generator().manual_seed(seed + 1))
    else:
        noise = _smooth_scores(k, h, w, seed=seed + 1)
    scores = noise + bias * own
    row_labels = torch.arange(k) // 2
    return scores.to(device), maps.to(device), row_labels.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "k,n,h,w,big_h,big_w,bias,rough",
    [
        (12, 4, 84, 112, 300, 451, 3.0, False),  # regions led clearly: no first-prediction C-vectors
        (12, 4, 84, 112, 300, 451, 0.0, False),  # contested: the unknown pixels decide some winners
        (8, 3, 40, 60, 97, 131, 0.4, False),
        (4, 2, 7, 9, 100, 13, 0.0, False),  # tall bands cut into pieces; columns downsampled
        (2, 5, 37, 29, 40, 60, 0.0, False),  # one label (two synonym rows): always decided
        (6, 3, 12, 16, 100, 130, 0.5, True),  # mostly unknown pixels: they decide the winners
    ],
)
def test_majority_vote_reads_first_labels_only_where_a_winner_can_change(
    monkeypatch, device, k, n, h, w, big_h, big_w, bias, rough
):
    """The full-size vote's winners equal the whole table's (every pixel counted, as
    ``joint_counts`` counts it, and as the dense maps give it), while the first prediction's
    C-vectors are read for no more unknown pixels than undecided regions hold."""
    num_labels = k // 2
    reads, read = [], []  # first-prediction pairs read per seed; (channels, pairs) per call
    flipped = []  # rough cases: whether ignoring the unknown pixels changed some winner
    original, leads = fullsize.boundary_argmax, fullsize._leads_by_more_than

    def counting(source, cols, boundary, pixels=None):
        read.append((source.shape[-3], len(boundary)))
        return original(source, cols, boundary, pixels)

    for seed in range(4):
        scores, maps, row_labels = _vote_case(k, n, h, w, 10 * seed + big_h, bias, device, rough)
        rows, cols = LinearAxis.build(h, big_h, device), LinearAxis.build(w, big_w, device)
        window = fullsize.OutputWindow(rows, cols, slice(0, big_h), slice(0, big_w))
        first = fullsize.Choice.of(scores, row_labels)
        regions = fullsize.Choice.of(maps, torch.arange(n, device=device))
        table = fullsize.joint_counts(first, regions, window, num_labels, n).view(n, num_labels)
        dense_first = row_labels[stretched(scores, rows, cols).max(dim=0).indices]
        dense_regions = stretched(maps, rows, cols).max(dim=0).indices
        dense = torch.bincount((dense_regions * num_labels + dense_first).reshape(-1),
                               minlength=n * num_labels).view(n, num_labels)  # fmt: skip
        assert torch.equal(table, dense)
        read.clear()
        monkeypatch.setattr(fullsize, "boundary_argmax", counting)
        votes, exact, boundary, region_at = fullsize.majority_table(
            first, regions, window, num_labels, n
        )
        monkeypatch.setattr(fullsize, "boundary_argmax", original)
        assert torch.equal(votes.argmax(dim=1), table.argmax(dim=1))
        assert torch.equal(votes[exact], table[exact]) and bool((votes <= table).all())
        assert torch.equal(region_at.long().masked_select(boundary.valid),
                           dense_regions.reshape(-1)[boundary.flat.masked_select(boundary.valid)])
        first_pairs = sum(p for channels, p in read if channels == k)
        unknown = int((~first.agree.reshape(-1)[boundary.cells(cols, w)]).sum())
        assert unknown > 0 and first_pairs <= unknown
        reads.append(first_pairs)
        labels = fullsize.vote(first, maps, scores, window, row_labels, num_labels, "majority")
        assert torch.equal(labels.long(), table.argmax(dim=1)[dense_regions])
        if rough:  # the unknown pixels matter here: the known ones alone pick wrong winners
            monkeypatch.setattr(fullsize, "_leads_by_more_than", lambda t, u: leads(t, u * 0))
            loose, *_ = fullsize.majority_table(first, regions, window, num_labels, n)
            monkeypatch.setattr(fullsize, "_leads_by_more_than", leads)
            flipped.append(not torch.equal(loose.argmax(dim=1), table.argmax(dim=1)))
    if rough:
        assert any(flipped)
    if bias >= 3.0 or num_labels == 1:
        assert reads == [0, 0, 0, 0]  # every winner settled by the pixels known from cells
    else:
        assert any(reads)  # some winner needed its unknown pixels: that branch ran


def test_a_leader_is_settled_only_when_no_unknown_pixels_can_tie_it():
    """Ties go to the smallest label, so a leader exactly ``unknown`` ahead is not settled."""
    table = torch.tensor([[3, 5, 0], [5, 3, 0], [3, 6, 0], [0, 0, 0]])
    unknown = torch.tensor([2, 2, 2, 0])
    assert fullsize._leads_by_more_than(table, unknown).tolist() == [False, False, True, False]


def _stretched_reference(seg, image, vocab):
    """The processing-size logits ``(K, H, W)`` and the cluster regions ``(H, W)`` (of ``n``)
    upsampled in one piece to the original size, as the official code would."""
    prepared = seg.prepare(image)
    h, w = prepared.resized
    processed = seg._process(prepared.pixels[None], vocab)
    size = image.shape[:2]
    logits = F.interpolate(processed.logits[:, :, :h, :w], size=size, mode="bilinear")[0]
    n = int(processed.clusters[0])
    maps = F.interpolate(processed.maps[:, :n, :h, :w], size=size, mode="bilinear")[0]
    return logits, maps.max(dim=0).indices, n


def _reference_cliptrase(seg, image, vocab):
    """Upsample the processing-size logits and cluster maps to the original size, argmax,
    majority vote (ties: smallest label): the paper's section 8 at the image's own size."""
    logits, regions, n = _stretched_reference(seg, image, vocab)
    pred = vocab.row_labels[logits.max(dim=0).indices]
    votes = torch.bincount(regions.reshape(-1) * vocab.num_labels + pred.reshape(-1),
                           minlength=n * vocab.num_labels)
    return votes.reshape(n, -1).argmax(dim=1)[regions].numpy()


@pytest.mark.parametrize("device", DEVICES)
def test_cliptrase_votes_at_the_original_size(tiny, astronaut, chelsea, device):
    vocab = tiny.vocabulary(*VOCAB)
    seg = on_device(tiny, device)
    for image in (astronaut, chelsea, astronaut[:301, :457]):
        result = seg.segment(image, vocab)
        expected = _reference_cliptrase(tiny, image, vocab)
        assert (result.labels == expected).mean() > 0.9999
        assert len(np.unique(result.labels)) > 1
        np.testing.assert_array_equal(
            result.counts, np.bincount(result.labels.ravel(), minlength=vocab.num_labels)
        )
        assert result.confidence_u8.shape == image.shape[:2]
        assert result.confidence_map.shape == tiny.prepare(image).resized


def test_the_mean_logits_vote_at_the_original_size(tiny, astronaut):
    """The authors' detectron2 variant: every full-size region takes the argmax of its summed
    stretched logits (it crashed on the uint8 region map before)."""
    refiner = dataclasses.replace(tiny.method.refiner, vote="mean_logits")
    seg = tiny.variant(method=tiny.method.with_options(refiner=refiner))
    vocab = tiny.vocabulary(*VOCAB)
    image = astronaut[:301, :457]
    result = seg.segment(image, vocab)
    logits, regions, n = _stretched_reference(seg, image, vocab)
    k = logits.shape[0]
    sums = torch.zeros(n, k).index_add_(0, regions.reshape(-1), logits.reshape(k, -1).T)
    expected = vocab.row_labels[sums.argmax(dim=1)][regions].numpy()
    assert n > 1 and len(np.unique(expected)) > 1
    assert (result.labels == expected).mean() > 0.9999


def test_area_and_probability_thresholds_at_the_original_size(tiny, chelsea):
    method = cliptrase.METHODS["sclip"].with_options(prob_thd=0.3, area_thd=0.2, crop=None)
    seg = tiny.variant(method=method)
    vocab = seg.vocabulary(["cat", "grass", "floor"], ["background", "wall"], synonyms=[["kitten"], [], []])
    prepared = seg.prepare(chelsea)
    h, w = prepared.resized
    processed = seg._process(prepared.pixels[None], vocab)
    logits = F.interpolate(processed.logits[:, :, :h, :w], size=chelsea.shape[:2], mode="bilinear")
    expected = decide(
        logits, vocab.row_labels, vocab.num_labels, vocab.background_label, seg.method.head
    )[0].numpy()
    labels = seg.segment(chelsea, vocab).labels
    assert (labels == expected).mean() > 0.9999
    assert (expected == vocab.background_label).any()


def test_windowed_images_are_labelled_at_the_original_size(tiny, astronaut):
    vocab = tiny.vocabulary(*VOCAB)
    panorama = np.concatenate([astronaut, astronaut[:, ::-1], astronaut], axis=1)[::2]  # 256 x 1536
    result = tiny.segment(panorama, vocab)
    assert result.windows > 1 and result.labels.shape == panorama.shape[:2]
    legacy = tiny.variant(config=cliptrase.SegmentorConfig(resolution="processing"))
    old = legacy.segment(panorama, vocab)
    assert old.windows == result.windows
    assert (old.labels == result.labels).mean() > 0.8  # same regions, finer boundaries
    np.testing.assert_array_equal(
        result.counts, np.bincount(result.labels.ravel(), minlength=vocab.num_labels)
    )


def test_original_size_output_is_unchanged(tiny):
    """Frozen from this implementation (written when the default became "original")."""
    expected = dict(np.load(FIXTURE))
    vocab = tiny.vocabulary(*VOCAB)
    result = tiny.segment(expected["image"], vocab)
    np.testing.assert_array_equal(result.labels, expected["labels"])
    assert result.confidence_map.shape == (336, 336)  # the processing resolution
    # One step at most: the float before rounding depends on the thread count in the last bit.
    assert np.abs(result.confidence_map.astype(int) - expected["confidence_map"]).max() <= 1
    panorama = tiny.segment(expected["panorama"], vocab)
    np.testing.assert_array_equal(panorama.labels, expected["panorama_labels"])
    assert len(np.unique(expected["labels"])) > 1


PEAK_SCRIPT = r"""
import json, resource, sys
import numpy as np, torch
import cliptrase
torch.set_num_threads(1)
seg = cliptrase.load_segmentor("ViT-Tiny-16-test", pretrained=None, device="cpu")
classes = [f"class {i}" for i in range(150)]
vocab = seg.vocabulary(classes, ["background"], templates=["a photo of a {}."])
rng = np.random.default_rng(0)
small = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
seg.segment(small, vocab)  # warm: every code path once
image = np.repeat(np.repeat(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), 10, 0), 10, 1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = seg.segment(image, vocab)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"shape": list(result.labels.shape), "grown_mb": (after - before) / 1024,
                  "image_mb": image.nbytes / 2**20}))
"""


def test_12_megapixels_with_150_classes_stays_within_half_a_gigabyte():
    """A full-size float map would be 150 x 12 M x 4 B = 7.2 GB; strips keep it bounded."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["shape"] == [3000, 4000]
    # Peak growth over the warm process, the 36 MB input image already allocated.
    assert figures["grown_mb"] < 512, figures


def _padded_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-tile cluster maps ``(n_g, h, w)`` as one ``(G, max n_g, h, w)``, ``-inf`` past each
    tile's own (as ``refine.cluster_maps`` pads them)."""
    n = max(m.shape[0] for m in maps)
    out = torch.full((len(maps), n, *maps[0].shape[1:]), float("-inf"), device=maps[0].device)
    for g, m in enumerate(maps):
        out[g, : m.shape[0]] = m
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["majority", "mean_logits"])
@pytest.mark.parametrize("prob_thd", [0.0, 0.4])
@pytest.mark.parametrize(
    "k,h,w,big_h,big_w,owned",
    [
        (8, 40, 60, 97, 131, None),
        (6, 12, 16, 100, 130, (slice(7, 81), slice(3, 130))),  # a window owning part
        (4, 7, 9, 100, 13, None),  # tall bands cut into pieces; columns downsampled
    ],
)
def test_stacked_tiles_get_exactly_each_tiles_own_labels(
    device, how, prob_thd, k, h, w, big_h, big_w, owned
):
    """Tiles decided as one stacked map get, pixel for pixel, the labels each gets alone:
    different cluster counts per tile (the stack's maps padded with -inf, which a zero-weight
    edge tap would turn into NaN), a shared lookup for the first prediction and per-tile
    region numbers, a plain head and a dense (``prob_thd``) one."""
    head = cliptrase.DecisionHead(prob_thd=prob_thd)
    rows, cols = LinearAxis.build(h, big_h, device), LinearAxis.build(w, big_w, device)
    ys, xs = owned or (slice(0, big_h), slice(0, big_w))
    window = fullsize.OutputWindow(rows.part(ys.start, ys.stop), cols.part(xs.start, xs.stop),
                                   ys, xs)  # fmt: skip
    scores, maps, alone = [], [], []
    for seed, n in enumerate((4, 2, 3, 1)):
        s, m, row_labels = _vote_case(k, n, h, w, 7 * seed + big_h, 0.3, device, rough=seed == 1)
        s = 4 * s  # logits' scale: prob_thd sends some pixels, not all, to the background
        scores.append(s)
        maps.append(m)
        first = fullsize.first_prediction(s, window, row_labels, k // 2, 0, head)
        alone.append(fullsize.vote(first, m, s, window, row_labels, k // 2, how))
    scores, padded = torch.stack(scores), _padded_maps(maps)
    tall = window.stacked(len(alone), h)
    assert tall.shape == (len(alone) * len(window.rows), len(window.cols))
    first = fullsize.first_prediction(scores, tall, row_labels, k // 2, 0, head)
    stacked = fullsize.vote(first, padded, scores, tall, row_labels, k // 2, how,
                            cluster_argmax=padded.max(dim=1).indices)  # fmt: skip
    assert torch.equal(stacked.view(len(alone), *window.shape), torch.stack(alone))
    assert any(len(torch.unique(labels)) > 1 for labels in alone)  # votes, not constants


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_of_same_size_images_is_labelled_as_each_image_alone(tiny, device):
    """Through the segmentor: one batch of photos at two original sizes (so two stacks) gets,
    from the same processed batch, the labels each tile gets from a stack of its own; an
    image with no clusters (every patch noise) keeps its first prediction in the batched
    processing-resolution vote too."""
    seg = on_device(tiny, device)
    vocab = seg.vocabulary(*VOCAB)
    photos = [getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")]
    sizes = [(640, 480), (640, 480), (500, 375), (640, 480), (500, 375)]
    images = [Image.fromarray(photos[i % 4]).resize(size) for i, size in enumerate(sizes)]
    prepared = [seg.prepare(image) for image in images]
    assert len({p.resized for p in prepared}) == 1 and len({p.original for p in prepared}) == 2
    tiles = [whole_tile(p, seg.patch_size) for p in prepared]
    with torch.inference_mode():
        processed = seg._process(torch.stack([t.pixels for t in tiles]).to(device), vocab)
        assert bool((processed.clusters > 0).all())
        # Image 0 loses its clusters, as an image whose every patch is noise: it must keep
        # its first prediction, at both resolutions, whatever the images batched with it.
        processed.clusters[0] = 0
        processed.maps[0] = float("-inf")
        canvases = [seg._canvas(p, vocab.num_labels) for p in prepared]
        windows = [c.window(t.owns, t.top, t.left) for c, t in zip(canvases, tiles)]
        rule = seg._rule(vocab)
        keys = [
            fullsize.stack_key(processed, b, c, t, rule)
            for b, (c, t) in enumerate(zip(canvases, tiles))
        ]
        assert sorted(keys.count(k) for k in set(keys)) == [1, 2, 2]  # image 0 apart
        for key in set(keys):
            members = [b for b, k in enumerate(keys) if k == key]
            together = fullsize.original_labels(processed, members, windows[members[0]], rule)
            alone = [fullsize.original_labels(processed, [b], windows[b], rule) for b in members]
            assert torch.equal(together, torch.cat(alone))
        voted = seg._processing_labels(processed, vocab)
        assert torch.equal(voted[0], processed.pred[0])
        regions = processed.region_maps()
        for b in range(1, len(prepared)):
            n = processed.cluster_count(b)
            expected = processed.maps[b, :n].max(dim=0).indices
            assert torch.equal(regions[b], expected)
            pred = processed.pred[b]
            votes = torch.bincount(expected.reshape(-1) * vocab.num_labels + pred.reshape(-1),
                                   minlength=n * vocab.num_labels)  # fmt: skip
            assert torch.equal(voted[b], votes.view(n, -1).argmax(dim=1)[expected])


@pytest.mark.parametrize("method", ["cliptrase", "maskclip", "naclip"])
def test_host_synchronisations_per_batch_do_not_grow_with_the_batch(tiny, astronaut, method):
    """Same-size images share their post-processing: the syncs a GPU's host would wait on
    are per batch, not per image, and so are the operators it would launch but for a few per
    image (canvases, sliding-window sums: measured 36 for MaskCLIP at batch 32, against 181
    when each image went alone). Counted on the branches a GPU takes. A 200 x 240 photo: the
    same prepared size, windows and counts as at 400 x 480, at ~half NACLIP's refining time."""
    prepared = tiny.prepare(astronaut[:200, :240])
    seg = tiny.variant(method=method)
    vocab = seg.vocabulary(*VOCAB)
    counts = {}
    with device_branches():
        for batch in (2, 6):
            seg.segment_batch([prepared] * batch, vocab, batch_size=batch)  # warm the caches
            with count_dispatch() as counted:
                seg.segment_batch([prepared] * batch, vocab, batch_size=batch)
            counts[batch] = counted
    assert counts[6].syncs == counts[2].syncs
    assert counts[2].operators > 200
    # NACLIP: 6 windows an image, each summed into its image (views, mostly), then PAMR.
    per_image = {"cliptrase": 40, "maskclip": 40, "naclip": 200}[method]
    assert (counts[6].operators - counts[2].operators) / 4 < per_image


def test_device_branches_give_the_same_labels(tiny, astronaut):
    """The CPU's own DBSCAN graph and median and the GPU's branches agree exactly."""
    vocab = tiny.vocabulary(*VOCAB)
    prepared = [tiny.prepare(astronaut), tiny.prepare(astronaut[::-1])]
    cpu = tiny.segment_batch(prepared, vocab)
    with device_branches():
        device = tiny.segment_batch(prepared, vocab)
    for a, b in zip(cpu, device):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.confidence_map, b.confidence_map)


@pytest.mark.parametrize("method", ["cliptrase", "maskclip", "naclip"])  # naclip: PAMR, prob_thd
def test_batched_post_processing_equals_one_image_at_a_time(monkeypatch, tiny, astronaut, method):
    """Through ``segment_batch``: stacks and groups as they come (two sizes, one image
    windowed, two with windows at the same places) give the bytes that stacks and groups of one
    give from the same batch: labels, confidence maps and counts."""
    seg = tiny.variant(method=method)
    vocab = seg.vocabulary(["person", "rocket", "flag", "grass"], ["background", "sky"])
    panorama = np.concatenate([astronaut, astronaut[:, ::-1], astronaut], axis=1)[::2]
    images = [astronaut[:301, :457], astronaut[:301, :457, ::-1].copy(), panorama,
              panorama[::-1].copy(), astronaut[::2, ::-1].copy()]  # fmt: skip
    if seg.protocol()[0] == "slide":  # the averaged crops: groups by size, no need to window
        images = images[:2] + images[4:] + [astronaut[::-2].copy()]
    batched = seg.segment_batch(images, vocab, batch_size=8)
    # Every tile a stack of its own, every sliding-window image a group of its own.
    monkeypatch.setattr(fullsize, "stack_key", lambda _, b, *a: (b,))
    monkeypatch.setattr(inference, "SLIDE_TAIL_ELEMENTS", 1)
    alone = seg.segment_batch(images, vocab, batch_size=8)
    for a, b in zip(batched, alone):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.confidence_map, b.confidence_map)
        np.testing.assert_array_equal(a.counts, b.counts)
    assert any(len(np.unique(r.labels)) > 1 for r in batched)
    assert batched[2].windows > 1 or method != "cliptrase"  # the panoramas are windowed
