"""The spec's invariants, each checked on the real code path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import median_filter

from cliptrase.attention import (
    recalibrated_correlation,
    self_correlation,
    self_self_attention,
)
from cliptrase.backbone import HeadProjections, resampled_positional_embedding
from cliptrase.forwards import thresholded_cosine, tile_modes
from cliptrase.inference import ownership_bounds, window_starts
from cliptrase.refine import (
    ClusterVote,
    dbscan_parameters,
    majority_vote,
    mean_logits_vote,
    median_filter_maps,
)

from .conftest import DEVICES, parity_pixels


def test_correlation_by_hand_on_three_tokens():
    # One head, three tokens, 2-d features chosen so the cosines are obvious.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.0, 2.0], [0.0, 3.0], [1.0, 0.0]])
    heads = HeadProjections(q[None, None], k[None, None], v[None, None])
    s = self_correlation(heads)[0]
    r2 = 2**-0.5
    cos_q = torch.tensor([[1, 0, r2], [0, 1, r2], [r2, r2, 1]])
    cos_k = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1.0]])
    cos_v = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1.0]])
    torch.testing.assert_close(s, (cos_q + cos_k + cos_v) / 3)
    # R: patch rows minus the [CLS] row, negatives clamped.
    r = recalibrated_correlation(s[None])[0]
    expected = (s[1:, 1:] - s[0, 1:]).clamp(min=0)
    torch.testing.assert_close(r, expected)
    assert r[1, 0] == 0  # s[2,1] - s[0,1] = r2/3 + 0 - (0 + 1 + 1)/3 < 0 -> clamped


def test_correlation_averages_over_heads():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 7, 8) for _ in range(3))
    s = self_correlation(HeadProjections(q, k, v))[0]
    per_head = [
        sum(F.cosine_similarity(t[0, h, :, None], t[0, h, None], dim=-1) for t in (q, k, v)) / 3
        for h in range(4)
    ]
    torch.testing.assert_close(s, torch.stack(per_head).mean(0), atol=1e-6, rtol=0)


def test_correlations_stay_float32_under_the_forwards_autocast():
    """S (DBSCAN's input) and the similarity-steering cosines are float32 products even inside
    a bf16 forward: autocast would round them, and thresholds act on their small differences."""
    g = torch.Generator().manual_seed(0)
    p = HeadProjections(*(torch.randn(2, 3, 17, 8, generator=g) for _ in range(3)))
    tokens = torch.randn(2, 17, 24, generator=g)
    want_s, want_cos = self_correlation(p), thresholded_cosine(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_s, got_cos = self_correlation(p), thresholded_cosine(tokens)
    assert got_s.dtype == torch.float32 and torch.equal(got_s, want_s)
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(got_cos, want_cos))


def test_last_block_attention_is_a_sum_of_three_softmaxes():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    out = self_self_attention(HeadProjections(q, k, v), "qkv")
    s = 4**-0.5
    a = sum(torch.softmax(s * t @ t.transpose(-1, -2), dim=-1) for t in (q, k, v))
    torch.testing.assert_close(out, a @ v, atol=1e-5, rtol=0)
    assert torch.allclose(a.sum(-1), torch.full((2, 3, 5), 3.0))  # sum, not mean


def test_correlation_is_non_negative_with_one_row_per_patch(tiny, astronaut):
    feats = tiny.dense_features(parity_pixels(tiny, astronaut, 336))
    assert feats.correlation.shape == (1, 441, 441)
    assert (feats.correlation >= 0).all()
    assert feats.patch_features.shape[1:3] == (21, 21)
    norms = feats.patch_features.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_positional_resampling_yields_the_grid_and_keeps_cls():
    pos = torch.randn(1 + 14 * 14, 32)
    out = resampled_positional_embedding(pos, (14, 14), (21, 30))
    assert out.shape == (1 + 21 * 30, 32)
    torch.testing.assert_close(out[0], pos[0])
    assert resampled_positional_embedding(pos, (14, 14), (14, 14)) is pos
    # The scale-factor form with the 0.1 offset samples differently from a plain size= resize.
    by_size = F.interpolate(
        pos[1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2), size=(21, 30), mode="bicubic"
    )
    by_size = by_size.permute(0, 2, 3, 1).reshape(-1, 32)
    assert not torch.allclose(out[1:], by_size)


def test_dbscan_parameters_published_pairs_and_scaling():
    assert dbscan_parameters(196) == (0.7, 3)
    assert dbscan_parameters(441) == (1.1, 7)
    eps, min_samples = dbscan_parameters(4 * 196)
    assert eps == pytest.approx(1.4) and min_samples == 12
    assert ClusterVote(eps=0.5).parameters_for(196) == (0.5, 3)


def test_every_cluster_region_carries_one_label(tiny, astronaut):
    pixels = parity_pixels(tiny, astronaut, 224)
    vocab = tiny.vocabulary(["person", "rocket", "grass"], background=["sky", "wall"])
    feats = tiny.dense_features(pixels)
    regions = tiny.method.refiner.regions(feats.correlation[0], feats.grid, (224, 224)).numpy()
    assert regions is not None and regions.max() >= 1  # several regions on this photo
    labels = tiny.segment_pixels(pixels, vocab)[0].numpy()
    for region in np.unique(regions):
        assert len(np.unique(labels[regions == region])) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 7, 7), (3, 56, 40), (2, 5, 9)])
def test_median_filter_maps_equals_scipy_reflect(shape, device):
    rng = np.random.default_rng(sum(shape))
    maps = rng.random(shape, dtype=np.float32)
    maps[0, :3] = 0.5  # ties and flat areas
    expected = np.stack([median_filter(m, size=7) for m in maps])
    out = median_filter_maps(torch.from_numpy(maps).to(device), 7).cpu().numpy()
    np.testing.assert_array_equal(out, expected)


def test_majority_vote_breaks_ties_towards_the_smallest_label():
    regions = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[3, 2, 1, 1], [2, 3, 0, 4]])
    out = majority_vote(torch.from_numpy(pred), torch.from_numpy(regions), num_labels=5).numpy()
    np.testing.assert_array_equal(out, [[2, 2, 1, 1], [2, 2, 1, 1]])


def test_mean_logits_vote_takes_the_regions_mean():
    regions = np.array([[0, 0, 1]])
    # Region 0: pixel 0 prefers label 0, pixel 1 label 1; a majority vote would tie to 0,
    # the mean logits (-1.5 vs 0) choose 1.
    logits = torch.tensor([[[1.0, -4.0, 0.0]], [[0.0, 0.0, 1.0]]])  # (K=2, 1, 3)
    regions = torch.from_numpy(regions)
    np.testing.assert_array_equal(mean_logits_vote(logits, regions).numpy(), [[1, 1, 1]])
    majority = majority_vote(torch.tensor([[0, 1, 1]]), regions, 2)
    np.testing.assert_array_equal(majority.numpy(), [[0, 0, 1]])


def _without_refiner(seg, **method_options):
    method = seg.method.with_options(refiner=None, correlation_block=None, **method_options)
    return seg.variant(method=method)


def test_background_words_collapse_to_one_label(tiny, chelsea):
    vocab = tiny.vocabulary(["cat", "grass"], background=["background", "wall", "floor", "sky"])
    assert vocab.names == ["cat", "grass", "background"] and vocab.embeddings.shape[0] == 6
    pixels = parity_pixels(tiny, chelsea, 224)
    logits = tiny.dense_features(pixels).patch_logits(vocab)
    first = F.interpolate(logits, size=(224, 224), mode="bilinear", align_corners=False).argmax(
        dim=1
    )[0]
    assert (first >= 3).any(), "fixture should let several background words win somewhere"
    labels = _without_refiner(tiny).segment_pixels(pixels, vocab)[0]
    torch.testing.assert_close(labels, first.clamp(max=2))
    # With the cluster vote too, labels stay within the C + 1 names.
    assert tiny.segment_pixels(pixels, vocab).max() <= 2


def test_cls_weighting_multiplies_logits_by_cls_scores(tiny, astronaut):
    seg = _without_refiner(tiny, cls_weighting=True)
    vocab = seg.vocabulary(["person", "rocket"])
    pixels = parity_pixels(seg, astronaut, 224)
    feats = seg.dense_features(pixels)
    weighted = feats.patch_logits(vocab) * feats.cls_logits(vocab)[:, :, None, None]
    up = F.interpolate(weighted, size=(224, 224), mode="bilinear", align_corners=False)
    expected = up.argmax(dim=1)[0].numpy()
    np.testing.assert_array_equal(seg.segment_pixels(pixels, vocab)[0].numpy(), expected)
    assert (feats.cls_logits(vocab) < 0).any() or not np.array_equal(
        expected,
        F.interpolate(feats.patch_logits(vocab), size=(224, 224), mode="bilinear")
        .argmax(1)[0]
        .numpy(),
    ), "weighting had no effect on this input; choose another"


def test_windows_cover_every_pixel_exactly_once():
    starts = window_starts(1000, 336, 224)
    assert starts[0] == 0 and starts[-1] == 1000 - 336
    bounds = ownership_bounds(starts, 336, 990)
    covered = np.zeros(990, int)
    for (a, b), s in zip(bounds, starts):
        assert s <= a and b <= s + 336  # a window owns only pixels it saw
        covered[a:b] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_tile_modes_break_ties_towards_the_smallest_value_as_torch_mode_on_the_cpu(device):
    """ResCLIP's per-patch mode: torch.mode's CPU answer (the official's operation), on every
    device; few values in small tiles make ties common."""
    g = torch.Generator().manual_seed(0)
    for patch, bound in [(2, 3), (4, 5), (3, 2), (16, 12)]:
        values = torch.randint(0, bound, (3, 4 * patch, 5 * patch), generator=g)
        tiles = values.unfold(1, patch, patch).unfold(2, patch, patch)
        want = torch.mode(tiles.reshape(*tiles.shape[:3], -1), dim=-1).values
        assert torch.equal(tile_modes(values.to(device), patch, bound).cpu(), want)
