"""Every method by name: attention, surgery, head, refiners and driver against literal references.

The references below are written from the methods' papers/code (docs/methods.md), with explicit
(N, N) matrices and loops, sharing nothing with ``cliptrase`` beyond open_clip's modules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

import cliptrase
from cliptrase import METHODS, ClusterVote, SegmentorConfig
from cliptrase.attention import ATTENTION_STRATEGIES, AttentionContext
from cliptrase.backbone import HeadProjections
from cliptrase.classfile import ClassList
from cliptrase.dbscan import dbscan, k_distance_knee
from cliptrase.head import DecisionHead, decide
from cliptrase.inference import SlidePlan
from cliptrase.methods import DATASET_OVERRIDES, method_for_dataset
from cliptrase.refine import PAMR, pamr

from .conftest import parity_pixels


def _softmax_rows(a):
    return torch.softmax(a, dim=-1)


# ------------------------------------------------------------------ literal attention references
def _ref_gaussian_bias(h, w, std):
    """NACLIP's construction: a (2h-1)x(2w-1) Gaussian window convolved over one-hot grids."""
    constant = 1 / (std * math.sqrt(2))
    axes = []
    for dim in (2 * h - 1, 2 * w - 1):
        start = -(dim - 1) / 2.0
        axes.append(torch.linspace(start * constant, (start + dim - 1) * constant, dim))
    window = torch.exp(-(torch.stack(torch.meshgrid(*axes, indexing="ij")) ** 2).sum(0))
    m = torch.einsum("ij,kl->ijkl", torch.eye(h), torch.eye(w)).permute(0, 3, 1, 2)
    out = F.conv2d(m.reshape(-1, 1, h, w), window[None, None], padding="same")
    out = out.reshape(h * w, h * w)
    full = torch.zeros(h * w + 1, h * w + 1)
    full[1:, 1:] = out
    return full


def _ref_attention(name, q, k, v, grid, std=5.0, inv_temp=None):
    """One head: q, k, v are (N, d)."""
    s = q.shape[-1] ** -0.5
    if name == "identity":
        return v
    if name == "vanilla":
        return _softmax_rows(s * q @ k.T) @ v
    if name == "qq":
        return _softmax_rows(s * q @ q.T) @ v
    if name == "kk":
        return _softmax_rows(s * k @ k.T) @ v
    if name == "qq+kk":
        return (_softmax_rows(s * q @ q.T) + _softmax_rows(s * k @ k.T)) @ v
    if name == "qq+kk+vv":
        return sum(_softmax_rows(s * t @ t.T) for t in (q, k, v)) @ v
    if name == "kk+gaussian":
        return _softmax_rows(s * k @ k.T + _ref_gaussian_bias(*grid, std)) @ v
    if name == "gem":
        t = s if inv_temp is None else inv_temp
        outs = []
        for x in (v, k, q):
            x = x / x.norm(dim=-1, keepdim=True)
            x = _softmax_rows(t * x @ x.T) @ x  # one iteration
            x = x / x.norm(dim=-1, keepdim=True)
            outs.append(_softmax_rows(t * x @ x.T) @ v)
        return sum(outs) / 3
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(ATTENTION_STRATEGIES))
def test_each_attention_strategy_matches_its_literal_formula(name):
    torch.manual_seed(3)
    grid = (2, 3)
    q, k, v = (torch.randn(2, 2, 7, 4) for _ in range(3))
    inv_temp = torch.tensor([0.7, 1.3])
    ctx = AttentionContext(grid=grid, gaussian_std=1.5, inverse_temperature=inv_temp)
    out = ATTENTION_STRATEGIES[name](HeadProjections(q, k, v), ctx)
    for b in range(2):
        for h in range(2):
            expected = _ref_attention(
                name, q[b, h], k[b, h], v[b, h], grid, std=1.5, inv_temp=float(inv_temp[b])
            )
            torch.testing.assert_close(out[b, h], expected, atol=1e-5, rtol=1e-5)


def test_naclip_bias_is_a_unit_peak_gaussian_of_grid_distance():
    bias = _ref_gaussian_bias(3, 4, 5.0)
    assert torch.all(bias[0] == 0) and torch.all(bias[:, 0] == 0)
    # patches (0, 0) and (2, 3): squared distance 13, std 5.
    torch.testing.assert_close(bias[1, 1 + 2 * 4 + 3], torch.tensor(math.exp(-13 / 50)))
    assert bias[5, 5] == 1.0


# ---------------------------------------------------------- literal surgery on the tiny model
@torch.no_grad()
def _ref_dense_patch_features(visual, pixels, method):
    """Blocks by hand: the original stream, and the modified stream over the last blocks."""
    x = visual.conv1(pixels)
    _, width, h, w = x.shape
    x = x.reshape(1, width, h * w).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.reshape(1, 1, -1), x], dim=1)
    x = visual.ln_pre(x + visual.positional_embedding)[0]  # (N, width), native grid
    blocks = list(visual.transformer.resblocks)
    first = len(blocks) - min(method.last_blocks, len(blocks))
    stream = None
    for index, block in enumerate(blocks):
        if index >= first:
            y = block.ln_1(x)
            qkv = y @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
            q, k, v = qkv.chunk(3, dim=-1)
            heads = block.attn.num_heads
            d = width // heads
            inv_temp = y.norm(dim=-1).mean() * d**-0.5
            outs = [
                _ref_attention(
                    method.attention,
                    *(t[:, i * d : (i + 1) * d] for t in (q, k, v)),
                    (h, w),
                    method.gaussian_std,
                    float(inv_temp),
                )
                for i in range(heads)
            ]
            attn = torch.cat(outs, dim=-1) @ block.attn.out_proj.weight.T
            attn = attn + block.attn.out_proj.bias
            base = x if stream is None else stream
            stream = base + attn if method.keep_residual else attn
            if method.keep_ffn:
                stream = stream + block.mlp(block.ln_2(stream))
        x = block(x[None])[0]
    out = visual.ln_post(stream) @ visual.proj
    out = out / out.norm(dim=-1, keepdim=True)
    return out[1:].reshape(h, w, -1)


@pytest.mark.parametrize("name", ["maskclip", "sclip", "clearclip", "naclip", "gem"])
def test_each_method_forward_matches_a_literal_block_by_block_reference(tiny, astronaut, name):
    seg = tiny.variant(method=name)
    pixels = parity_pixels(seg, astronaut, 224)
    feats = seg.dense_features(pixels)
    # The method's tower (MaskCLIP's: exact GELU, LayerNorm eps 1e-6; test_fidelity.py pins it).
    expected = _ref_dense_patch_features(seg.backbone.visual, pixels, seg.method)
    torch.testing.assert_close(feats.patch_features[0], expected, atol=2e-5, rtol=1e-4)
    assert feats.correlation is None


def test_methods_really_differ(tiny, astronaut):
    pixels = parity_pixels(tiny, astronaut, 224)
    feats = {
        name: tiny.variant(method=name).dense_features(pixels).patch_features for name in METHODS
    }
    names = sorted(feats)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(feats[a], feats[b], atol=1e-4), (a, b)


# -------------------------------------------------------------------------------- presets
def test_preset_defaults():
    m = METHODS
    new = {"scclip", "sfp", "dihclip", "resclip", "resclip_sclip"}  # test_dense_forwards.py
    assert set(m) == {"cliptrase", "maskclip", "sclip", "clearclip", "naclip", "gem"} | new
    c = m["cliptrase"]
    assert (c.attention, c.keep_residual, c.keep_ffn, c.correlation_block) == (
        "qq+kk+vv",
        True,
        True,
        -2,
    )
    assert isinstance(c.refiner, ClusterVote) and c.head == DecisionHead()
    assert (c.short_side, c.crop, c.templates) == (336, None, None)
    mk = m["maskclip"]
    assert (mk.attention, mk.keep_residual, mk.keep_ffn, mk.refiner) == (
        "identity",
        True,
        True,
        None,
    )
    assert (mk.short_side, mk.crop, len(mk.templates)) == (512, None, 85)
    assert mk.templates[-1] == "this is one {} in the scene."
    s = m["sclip"]
    assert (s.attention, s.keep_residual, s.keep_ffn) == ("qq+kk", True, True)
    assert (s.short_side, s.crop, s.stride) == (336, 224, 112)
    assert s.head == DecisionHead(logit_scale=40.0, prob_thd=0.1, area_thd=None)
    assert s.pamr is None and s.refiner is None
    cl = m["clearclip"]
    assert (cl.attention, cl.keep_residual, cl.keep_ffn) == ("qq", False, False)
    assert (cl.short_side, cl.crop, cl.stride, cl.head.logit_scale) == (448, 448, 224, 50.0)
    n = m["naclip"]
    assert (n.attention, n.gaussian_std, n.keep_residual, n.keep_ffn) == (
        "kk+gaussian",
        5.0,
        False,
        False,
    )
    assert (n.short_side, n.crop, n.stride, n.head.logit_scale, n.head.prob_thd) == (
        336,
        224,
        112,
        40.0,
        0.1,
    )
    g = m["gem"]
    assert (g.attention, g.last_blocks, g.keep_residual, g.keep_ffn) == ("gem", 6, True, False)
    assert (g.gem_iterations, g.gem_temperature, g.short_side, g.crop) == (1, None, 448, None)
    assert g.templates == ("a photo of a {}.",)


def test_dataset_overrides_and_options():
    voc = method_for_dataset("sclip", "voc21")
    assert voc.head == DecisionHead(logit_scale=65.0, prob_thd=0.1, area_thd=0.1)
    assert method_for_dataset("naclip", "voc21").crop is None
    assert method_for_dataset("clearclip", "voc21").head.prob_thd == 0.5
    assert method_for_dataset("cliptrase", "voc21") is METHODS["cliptrase"]
    assert set(DATASET_OVERRIDES) <= set(METHODS)
    assert cliptrase.METHOD_NAMES == tuple(METHODS)  # the torch-free list the driver reads
    with_vote = METHODS["sclip"].with_options(refiner=ClusterVote())
    assert with_vote.correlation_block == -2  # the vote brings its correlation
    with pytest.raises(ValueError, match="unknown method"):
        cliptrase.load_segmentor("ViT-Tiny-16-test", pretrained=None, method="segformer")


def test_config_short_side_none_takes_the_methods_and_explicit_wins(tiny):
    seg = tiny.variant(method="clearclip")
    assert seg.clip is tiny.clip  # a variant shares the model: no reload
    assert seg.config.short_side == 448 and seg.protocol() == ("slide", 448, 448, 224)
    seg = tiny.variant(
        method="clearclip",
        config=SegmentorConfig(short_side=224, mode="whole"),
    )
    assert seg.protocol() == ("whole", 224, None, None)


# ------------------------------------------------------------------------------------ head
def _ref_sclip_head(logits, query_idx, scale, prob_thd, area_thd, bg):
    """SCLIP's postprocess_result for one image, background at label ``bg``."""
    probs = (logits * scale).softmax(0)
    num_cls = int(max(query_idx)) + 1
    one_hot = F.one_hot(torch.tensor(query_idx)).T.reshape(num_cls, len(query_idx), 1, 1)
    probs = (probs[None] * one_hot).max(1)[0]
    if area_thd is not None:
        pred = F.one_hot(probs.argmax(0), num_cls).float()
        fg = [c for c in range(num_cls) if c != bg]
        area = pred[:, :, fg].sum((0, 1))
        keep = (area > area_thd * area.sum()).float()
        probs[fg] *= keep[:, None, None]
    pred = probs.argmax(0)
    pred[probs.max(0)[0] < prob_thd] = bg
    return pred


@pytest.mark.parametrize("area_thd", [None, 0.2])
def test_head_matches_sclips_postprocess_with_synonyms_and_thresholds(area_thd):
    torch.manual_seed(5)
    # labels: 0, 1, 2 = background; rows: 0, 1, bg, bg, synonym of 0, synonym of 1
    row_labels = torch.tensor([0, 1, 2, 2, 0, 1])
    cos = torch.rand(2, 6, 9, 9) * 0.3
    cos[0, 1, :2] += 0.2  # label 1 wins only a small area in image 0
    head = DecisionHead(logit_scale=40.0, prob_thd=0.3, area_thd=area_thd)
    pred = decide(40.0 * cos, row_labels, 3, 2, head)
    for b in range(2):
        expected = _ref_sclip_head(cos[b], row_labels.tolist(), 40.0, 0.3, area_thd, 2)
        torch.testing.assert_close(pred[b], expected)
    assert (pred == 2).any() and (pred != 2).any()


def test_synonym_max_scores_a_class_by_its_best_phrase(tiny, chelsea):
    seg = tiny.variant(method="sclip")
    vocab = seg.vocabulary(["cat", "grass"], ["sky", "wall"], synonyms=[["kitten", "kitty"], []])
    assert vocab.names == ["cat", "grass", "background"]
    assert vocab.row_labels.tolist() == [0, 1, 2, 2, 0, 0]
    assert vocab.prompts == ["cat", "grass", "sky", "wall", "kitten", "kitty"]
    pixels = seg.prepare(chelsea).pixels[None]
    logits = F.interpolate(
        seg.dense_features(pixels).patch_logits(vocab, 40.0),
        size=pixels.shape[-2:],
        mode="bilinear",
    )
    probs = logits.softmax(1)
    pooled = torch.stack([probs[:, [0, 4, 5]].max(1)[0], probs[:, 1], probs[:, 2:4].max(1)[0]], 1)
    expected = pooled.argmax(1)
    expected[pooled.max(1)[0] < 0.1] = 2
    np.testing.assert_array_equal(seg.segment_pixels(pixels, vocab).numpy(), expected.numpy())


def test_vocabulary_from_a_class_list_scores_synonyms_and_per_class_templates(tiny):
    cl = ClassList(
        names=("person", "car"),
        synonyms=(("pedestrian",), ()),
        background=("sky",),
        templates=("a photo of a {}.",),
        class_templates=(None, ("a blurry photo of a {}.",)),
    )
    vocab = tiny.vocabulary_from(cl)
    assert vocab.names == cl.label_names and vocab.embeddings.shape[0] == 4
    plain = tiny.vocabulary(["person", "car", "pedestrian"], templates=["a photo of a {}."])
    torch.testing.assert_close(vocab.embeddings[0], plain.embeddings[0])
    torch.testing.assert_close(vocab.embeddings[3], plain.embeddings[2])  # pedestrian row
    car = tiny.vocabulary(["car"], templates=["a blurry photo of a {}."])
    torch.testing.assert_close(vocab.embeddings[1], car.embeddings[0])


# ------------------------------------------------------------------------------------ PAMR
def _ref_pamr(image, logits, steps, dilations):
    """Loops over pixels and neighbours (replicate borders), in numpy float64."""
    k, h, w = image.shape
    c = logits.shape[0]
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]

    def at(a, y, x):
        return a[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    weights = np.zeros((h, w, 8 * len(dilations)))
    for y in range(h):
        for x in range(w):
            window = np.stack(
                [at(image, y + dy * d, x + dx * d) for d in dilations for dy, dx in offsets]
            )  # (9 * nd, K)
            sigma = window.std(axis=0, ddof=1)
            aff = [
                -np.abs(image[:, y, x] - at(image, y + dy * d, x + dx * d)) / (1e-8 + 0.1 * sigma)
                for d in dilations
                for dy, dx in offsets
                if (dy, dx) != (0, 0)
            ]
            a = np.mean(aff, axis=1)
            weights[y, x] = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
    out = logits.astype(np.float64)
    for _ in range(steps):
        new = np.zeros_like(out)
        for y in range(h):
            for x in range(w):
                neigh = [
                    at(out, y + dy * d, x + dx * d)
                    for d in dilations
                    for dy, dx in offsets
                    if (dy, dx) != (0, 0)
                ]
                new[:, y, x] = (np.stack(neigh, axis=1) * weights[y, x]).sum(axis=1)
        out = new
    return out.reshape(c, h, w)


def test_pamr_matches_a_pixel_loop_reference():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 6, 7)).astype(np.float32)
    image[:, :, 4:] += 3.0  # an edge PAMR should respect
    logits = rng.normal(size=(2, 6, 7)).astype(np.float32)
    out = pamr(torch.from_numpy(image)[None], torch.from_numpy(logits)[None], 3, (1, 2))[0]
    np.testing.assert_allclose(out.numpy(), _ref_pamr(image, logits, 3, (1, 2)), atol=1e-5)


def test_pamr_keeps_constant_logits_and_averages():
    image = torch.randn(1, 3, 8, 8)
    const = torch.full((1, 2, 8, 8), 0.25)
    torch.testing.assert_close(pamr(image, const, 5, (1, 2)), const)
    logits = torch.randn(1, 2, 8, 8)
    out = pamr(image, logits, 1, (1,))
    assert out.min() >= logits.min() - 1e-6 and out.max() <= logits.max() + 1e-6
    torch.testing.assert_close(pamr(image, logits, 0, (1,)), logits)


# ----------------------------------------------------------------- refiners on any method
def test_pamr_and_the_cluster_vote_run_on_any_method(tiny, astronaut):
    vocab = tiny.vocabulary(["person", "rocket", "grass"], ["sky"])
    pixels = parity_pixels(tiny, astronaut, 224)
    plain = tiny.variant(method="sclip")
    voted = tiny.variant(
        method=METHODS["sclip"].with_options(refiner=ClusterVote()),
    )
    a = plain.segment_pixels(pixels, vocab)[0].numpy()
    b = voted.segment_pixels(pixels, vocab)[0].numpy()
    assert (a != b).any()
    feats = voted.dense_features(pixels)
    regions = ClusterVote().regions(feats.correlation[0], feats.grid, (224, 224)).numpy()
    for r in np.unique(regions):
        assert len(np.unique(b[regions == r])) == 1
    smoothed = tiny.variant(
        method=METHODS["cliptrase"].with_options(pamr=PAMR(10, (8, 16)), refiner=None),
    )
    first = tiny.variant(
        method=METHODS["cliptrase"].with_options(refiner=None),
    )
    c = smoothed.segment_pixels(pixels, vocab)[0].numpy()
    assert (c != first.segment_pixels(pixels, vocab)[0].numpy()).any()
    assert smoothed.segment(astronaut, vocab).labels.shape == astronaut.shape[:2]


# ------------------------------------------------------------------ eps from the data
def _cluster(rows: np.ndarray, eps, min_samples: int) -> np.ndarray:
    return dbscan(torch.as_tensor(rows, dtype=torch.float32)[None], eps, min_samples)[0].numpy()


def _eps(vote: ClusterVote, rows: np.ndarray):
    eps, min_samples = vote.eps_for(torch.as_tensor(rows, dtype=torch.float32)[None])
    return (float(eps[0]) if isinstance(eps, torch.Tensor) else eps), min_samples


def test_auto_eps_finds_blobs_and_is_scale_free():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 20)) * 3
    rows = np.concatenate([c + 0.1 * rng.normal(size=(30, 20)) for c in centres])
    rows = np.concatenate([rows, rng.normal(size=(5, 20)) * 6]).astype(np.float32)  # outliers
    vote = ClusterVote(eps="auto", min_samples=4)
    eps, _ = _eps(vote, rows)
    labels = _cluster(rows, eps, 4)
    assert len(set(labels[:120]) - {-1}) == 4
    for s in (0.01, 30.0):
        scaled = (rows * s).astype(np.float32)
        knee = float(k_distance_knee(torch.from_numpy(scaled)[None], 4)[0])
        assert knee == pytest.approx(eps * s, rel=1e-5)
        np.testing.assert_array_equal(_cluster(scaled, knee, 4), labels)


def test_auto_eps_recovers_clusters_where_the_published_eps_collapses(vit_b16, astronaut):
    """A larger backbone's R lives on another scale; simulate it by scaling ViT-B/16's R."""
    pixels = parity_pixels(vit_b16, astronaut, 224)
    r = vit_b16.dense_features(pixels).correlation[0].numpy()
    published = ClusterVote()
    auto = ClusterVote(eps="auto")
    base = _cluster(r, *_eps(auto, r))
    assert len(set(base) - {-1}) >= 2
    for scale in (0.1, 10.0):
        scaled = (r * scale).astype(np.float32)
        collapsed = _cluster(scaled, *_eps(published, scaled))
        # Collapsed: (nearly) everything noise, or one cluster.
        assert (collapsed == -1).mean() > 0.8 or len(set(collapsed) - {-1}) <= 1
        rescaled = _cluster(scaled, *_eps(auto, scaled))
        # Same clustering up to points lying on the eps boundary (float rounding).
        assert adjusted_rand_score(base, rescaled) > 0.95
    with pytest.raises(ValueError, match="auto"):
        ClusterVote(eps="knee")


# ----------------------------------------------------------------- driver and batching
def test_slide_grid_is_mmsegs():
    for h, crop, stride in [(336, 224, 112), (448, 224, 112), (500, 224, 112), (200, 224, 112)]:
        grids = max(h - crop + stride - 1, 0) // stride + 1
        expected = sorted({max(min(i * stride + crop, h) - crop, 0) for i in range(grids)})
        prepared = cliptrase.preprocess.Prepared(
            torch.zeros(3, -(-h // 16) * 16, 240), (h, 240), (h, 240)
        )
        plan = SlidePlan.build(prepared, 16, crop, stride)
        assert sorted({t.top for t in plan.tiles}) == expected


def _ref_slide_logits(seg, pixels, vocab, crop, stride, scale):
    """NACLIP's forward_slide, one crop at a time."""
    _, _, h, w = pixels.shape
    k = vocab.embeddings.shape[0]
    preds = torch.zeros(1, k, h, w)
    count = torch.zeros(1, 1, h, w)
    for hi in range(max(h - crop + stride - 1, 0) // stride + 1):
        for wi in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(hi * stride + crop, h), min(wi * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            c = pixels[:, :, y1:y2, x1:x2]
            logits = seg.dense_features(c).patch_logits(vocab, scale)
            logits = F.interpolate(logits, size=c.shape[-2:], mode="bilinear")
            preds += F.pad(logits, (x1, w - x2, y1, h - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@pytest.mark.parametrize("with_pamr", [False, True])
def test_sliding_window_equals_the_published_loop(tiny, chelsea, with_pamr):
    """NACLIP's predict: slide, (resize to the original: identity here), PAMR if on, head."""
    method = METHODS["naclip"] if with_pamr else METHODS["naclip"].with_options(pamr=None)
    seg = tiny.variant(method=method)
    vocab = seg.vocabulary(["cat", "grass", "floor"], ["background", "wall"])
    prepared = seg.prepare(chelsea)  # 336 x 505 -> padded 336 x 512
    assert prepared.resized == (336, 505)
    # 505 is not a patch multiple: compare on the 336 x 496 part the reference can crop.
    pixels = prepared.pixels[None, :, :, :496]
    item = cliptrase.preprocess.Prepared(pixels[0], (336, 496), (336, 496))
    result = seg.segment_batch([item], vocab)[0]
    logits = _ref_slide_logits(seg, pixels, vocab, 224, 112, 40.0)
    if with_pamr:  # pamr() itself is pinned by test_pamr_matches_a_pixel_loop_reference
        logits = pamr(pixels, logits, 10, (8, 16))
    expected = decide(
        logits, vocab.row_labels, vocab.num_labels, vocab.background_label, seg.method.head
    )[0].numpy()
    assert result.windows == 2 * 4
    np.testing.assert_array_equal(result.labels, expected)


@pytest.mark.parametrize("name", ["sclip", "naclip", "clearclip", "gem", "maskclip"])
def test_batched_inference_equals_one_at_a_time(tiny, astronaut, chelsea, name):
    method = METHODS[name]
    if name == "naclip":
        method = method.with_options(pamr=PAMR(2, (4, 8)))
    seg = tiny.variant(method=method)
    vocab = seg.vocabulary(["person", "cat", "grass"], ["sky", "wall"], synonyms=[["man"], [], []])
    images = [astronaut[:256, :300], chelsea, astronaut[:200, :150].copy(), chelsea[::-1].copy()]
    batched = seg.segment_batch(images, vocab, batch_size=5)
    assert sum(r.windows for r in batched) > len(images) or not method.crop
    for image, result in zip(images, batched):
        single = seg.segment_batch([image], vocab, batch_size=1)[0]
        # Equal up to float ties: a batched matmul may round the last bit differently, which
        # can flip a pixel whose two best labels tie (seen: 1 pixel of 135,300 for clearclip).
        assert (result.labels != single.labels).mean() < 1e-4
        # Confidence is stored in steps of 1/255: the same last-bit rounding can move one step;
        # where it flipped a label, the confidence is that of the other label (seen: 1 pixel
        # of 135,300 for gem, on an AMD EPYC host), as rare as the flipped labels.
        steps = np.abs(result.confidence - single.confidence) > 1 / 255 + 1e-6
        assert steps.mean() < 1e-4
        assert result.labels.shape == image.shape[:2]
