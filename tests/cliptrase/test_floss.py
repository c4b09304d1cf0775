"""FLOSS (cliptrase.floss) against literal references of the official yasserben/FLOSS code:
``EntropyMetric.process/compute_metrics`` (ranking), ``_load_template_rankings`` (selection),
``encode_text_features`` (expert classifiers) and ``expert_fusion`` (fusion)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from cliptrase import METHODS, SegmentorConfig, floss

CLASSES = ["person", "cat", "cup"]
TEMPLATES = [
    "a photo of a {}.",
    "a {}.",
    "art of the {}.",
    "a blurry photo of a {}.",
    "itap of a {}.",
    "a sculpture of the {}.",
]


def _photos(short_side: int) -> list[np.ndarray]:
    """Photos resized so their short side is the method's: processing size = original size."""
    out = []
    for array in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()):
        image = Image.fromarray(array)
        scale = short_side / min(image.size)
        size = (round(image.width * scale) // 16 * 16, round(image.height * scale) // 16 * 16)
        out.append(np.asarray(image.resize(size)))
    return out


def _reference_probs(seg, image: np.ndarray, template: str) -> np.ndarray:
    """``(C, H, W)``: one template's class probabilities as the official code gets them: its
    single-template classifier, the method's forward, mmseg's slide loop (or the whole image),
    softmax at the head's scale. Built from public pieces only."""
    vocab = seg.vocabulary(CLASSES, templates=[template])
    pixels = seg.prepare(image).pixels[None]
    h, w = image.shape[:2]
    mode, _, crop, stride = seg.protocol()
    if mode == "whole":
        feats = seg.dense_features(pixels)
        logits = feats.patch_logits(vocab, seg.logit_scale_used)
        logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear")[0, :, :h, :w]
    else:
        logits = torch.zeros(len(CLASSES), h, w)
        count = torch.zeros(1, h, w)
        h_grids = max(h - crop + stride - 1, 0) // stride + 1
        w_grids = max(w - crop + stride - 1, 0) // stride + 1
        for hi in range(h_grids):
            for wi in range(w_grids):
                y1, x1 = hi * stride, wi * stride
                y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                crop_pixels = pixels[:, :, y1:y2, x1:x2]
                out = seg.dense_features(crop_pixels).patch_logits(vocab, seg.logit_scale_used)
                out = F.interpolate(out, size=crop_pixels.shape[-2:], mode="bilinear")
                logits[:, y1:y2, x1:x2] += out[0]
                count[:, y1:y2, x1:x2] += 1
        logits = logits / count
    return torch.softmax(logits, dim=0).numpy()


def _reference_ranking(prob_maps: list[list[np.ndarray]], top_k: int) -> list[list[int]]:
    """EntropyMetric: per template and class, sum of (mean entropy x count) over images of the
    pixels predicted as the class, divided by the count (0.0 when never predicted); sorted
    ascending; then _load_template_rankings drops pixel_percentage 0 and keeps top_n."""
    num_templates = len(prob_maps[0])
    data = {t: {c: [0.0, 0.0] for c in range(len(CLASSES))} for t in range(num_templates)}
    for per_template in prob_maps:
        for t, prob in enumerate(per_template):
            pred = prob.argmax(axis=0)
            for c in range(len(CLASSES)):
                mask = pred == c
                if not mask.any():
                    continue
                p = prob[:, mask]
                entropy = -(p * np.log(p + 1e-10)).sum(axis=0)
                data[t][c][0] += float(entropy.mean()) * int(mask.sum())
                data[t][c][1] += int(mask.sum())
    chosen = []
    for c in range(len(CLASSES)):
        rows = []
        for t in range(num_templates):
            total, count = data[t][c]
            rows.append({"t": t, "entropy": total / count if count else 0.0, "count": count})
        rows = sorted(rows, key=lambda r: r["entropy"])
        chosen.append([r["t"] for r in rows if r["count"] > 0][:top_k])
    return chosen


@pytest.mark.parametrize("method", ["maskclip", "sclip", "naclip"])
def test_ranking_matches_the_official_procedure(tiny, method):
    # max_patches: MaskCLIP's official protocol runs 512 x 768 whole, as the reference does.
    # NACLIP without its default PAMR: the reference is the ranking's maps as FLOSS's code
    # builds them, which has no PAMR step (with PAMR, our ranking refines them first).
    preset = METHODS[method].with_options(pamr=None) if method == "naclip" else method
    seg = tiny.variant(method=preset, config=SegmentorConfig(max_patches=4096))
    images = _photos(seg.config.short_side)
    experts = floss.rank_templates(seg, images, CLASSES, TEMPLATES, top_k=2)
    maps = [[_reference_probs(seg, image, t) for t in TEMPLATES] for image in images]
    assert [list(e) for e in experts.experts] == _reference_ranking(maps, 2)
    assert experts.images == len(images) and experts.templates == tuple(TEMPLATES)
    # The per-class means the choice rests on are the reference's too (up to float rounding).
    for c in range(len(CLASSES)):
        for t in range(len(TEMPLATES)):
            pred = [m[t].argmax(0) == c for m in maps]
            count = sum(int(p.sum()) for p in pred)
            # Float rounding (all templates in one einsum) may flip a near-tied pixel or two.
            assert abs(experts.pixels[c][t] - count) <= max(2, count // 10_000)
            if count > 100:
                ent = sum(
                    float((-(m[t][:, p] * np.log(m[t][:, p] + 1e-10)).sum(0)).sum())
                    for m, p in zip(maps, pred)
                )
                assert experts.entropy[c][t] == pytest.approx(ent / count, rel=1e-3)
            elif count == 0:
                assert experts.entropy[c][t] is None


def test_ranked_maps_are_what_the_segmentor_labels(tiny):
    """Each template's argmax over the ranking's maps is that template's segmentation."""
    seg = tiny.variant(method="sclip")
    image = _photos(seg.config.short_side)[0]
    for template in TEMPLATES[:3]:
        prob = _reference_probs(seg, image, template)
        labels = seg.segment(image, seg.vocabulary(CLASSES, templates=[template])).labels
        assert (prob.argmax(0) == labels).mean() > 0.999


def test_ranking_is_deterministic_and_follows_the_sample(tiny):
    seg = tiny.variant(method="naclip")
    pool = [
        np.asarray(Image.fromarray(a).resize((112, 96)))
        for a in (
            skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
            skimage.data.rocket(), np.stack([skimage.data.camera()] * 3, -1),
            skimage.data.immunohistochemistry(), skimage.data.hubble_deep_field(),
        )
    ]

    def rank(seed: int):
        chosen = [pool[i] for i in floss.sample_indices(len(pool), 2, seed)]
        return floss.rank_templates(seg, chosen, CLASSES, TEMPLATES, top_k=1).to_dict()

    assert rank(0) == rank(0)
    assert floss.sample_indices(len(pool), 2, 0) == floss.sample_indices(len(pool), 2, 0)
    samples = {tuple(floss.sample_indices(len(pool), 2, s)) for s in range(8)}
    assert len(samples) > 1
    rankings = {str(rank(s)["experts"]) for s in range(8)}
    assert len(rankings) > 1, "experts must depend on which images were sampled"


def test_a_top_k_that_ranks_nothing_out_is_announced(tiny, caplog):
    seg = tiny.variant(method="sclip")
    image = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((112, 96)))
    for top_k, warned in ((len(TEMPLATES) - 1, False), (len(TEMPLATES), True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="cliptrase"):
            floss.rank_templates(seg, [image], CLASSES, TEMPLATES, top_k=top_k)
        assert ("no template is ranked out" in caplog.text) is warned, top_k


def test_expert_vocabulary_is_the_literal_construction(tiny):
    seg = tiny.variant(method="sclip")
    experts = floss.TemplateExperts(
        classes=tuple(CLASSES), templates=tuple(TEMPLATES), top_k=2, images=1,
        experts=((4, 1), (), (0,)),
        entropy=((None,) * 6,) * 3, pixels=((0,) * 6,) * 3,
    )
    vocab = seg.vocabulary(CLASSES, ["sky"], TEMPLATES, experts=experts)
    plain = seg.vocabulary(CLASSES, ["sky"], TEMPLATES)
    assert torch.equal(vocab.embeddings, plain.embeddings)
    assert vocab.expert_labels == (0, 2)  # "cat" was never predicted: no expert
    rows = CLASSES + ["sky"]

    def literal(templates):  # official encode_text_features, per element of query_words
        out = []
        for word in rows:
            tokens = seg.tokenizer([t.format(word) for t in templates])
            feature = seg.clip.encode_text(tokens)
            feature = feature / feature.norm(dim=-1, keepdim=True)
            feature = feature.mean(dim=0)
            out.append(feature / feature.norm())
        return torch.stack(out)

    with torch.no_grad():
        expected = torch.stack([literal([TEMPLATES[4], TEMPLATES[1]]), literal([TEMPLATES[0]])])
    torch.testing.assert_close(vocab.expert_embeddings, expected, atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="other templates"):
        seg.vocabulary(CLASSES, ["sky"], TEMPLATES[:3], experts=experts)


def _literal_fusion(expert_probs: np.ndarray, default_prob: np.ndarray) -> np.ndarray:
    """The official ``expert_fusion`` (expert ``e`` is class ``e``'s), loop for loop."""
    num_experts, c, h, w = expert_probs.shape
    predictions = expert_probs.argmax(axis=1)
    final = np.zeros((c, h, w), dtype=expert_probs.dtype)
    masks = np.stack([predictions[e] == e for e in range(num_experts)])
    overlap = masks.sum(axis=0)
    for e in range(num_experts):
        m = masks[e] & (overlap == 1)
        final[:, m] = expert_probs[e][:, m]
    final[:, overlap == 0] = default_prob[:, overlap == 0]
    conflict = overlap > 1
    max_probs = np.full((h, w), -1.0)
    selected = np.full((h, w), -1)
    for e in range(num_experts):
        current = masks[e] & conflict
        update = current & (expert_probs[e, e] > max_probs)
        max_probs[update] = expert_probs[e, e][update]
        selected[update] = e
    for e in range(num_experts):
        m = selected == e
        final[:, m] = expert_probs[e][:, m]
    return final


def test_fusion_is_the_official_expert_fusion():
    generator = torch.Generator().manual_seed(0)
    c, h, w = 4, 12, 12
    default = torch.randn(1, c, h, w, generator=generator) * 3
    experts = torch.randn(1, c, c, h, w, generator=generator) * 3
    fused = floss.fuse_expert_logits(
        default, experts, torch.arange(c), torch.arange(c), c
    ).exp()
    probs = torch.softmax(experts[0], dim=1).numpy()
    expected = _literal_fusion(probs, torch.softmax(default[0], 0).numpy())
    np.testing.assert_allclose(fused[0].numpy(), expected, atol=1e-6)
    overlap = np.stack([probs[e].argmax(0) == e for e in range(c)]).sum(0)
    assert (overlap == 0).any() and (overlap == 1).any() and (overlap > 1).any()


@pytest.mark.parametrize("method", ["cliptrase", "sclip", "maskclip"])
def test_experts_of_every_template_label_as_the_plain_vocabulary(tiny, method):
    """Every expert classifier = the default one: the fusion returns the default's labels."""
    seg = tiny.variant(method=method)
    everything = tuple(range(len(TEMPLATES)))
    experts = floss.TemplateExperts(
        classes=tuple(CLASSES), templates=tuple(TEMPLATES), top_k=len(TEMPLATES), images=0,
        experts=(everything,) * 3, entropy=((None,) * 6,) * 3, pixels=((0,) * 6,) * 3,
    )
    images = _photos(seg.config.short_side)[:2]
    fused = seg.segment_batch(images, seg.vocabulary(CLASSES, ["sky"], TEMPLATES, experts=experts))
    plain = seg.segment_batch(images, seg.vocabulary(CLASSES, ["sky"], TEMPLATES))
    for a, b in zip(fused, plain):
        assert (a.labels == b.labels).mean() > 0.999
        assert a.random_weights


def test_ranked_experts_change_the_labels_and_round_trip(tiny):
    seg = tiny.variant(method="naclip")
    images = _photos(seg.config.short_side)
    experts = floss.rank_templates(seg, images, CLASSES, TEMPLATES, top_k=1)
    assert floss.TemplateExperts.from_dict(experts.to_dict()) == experts
    fused = seg.segment_batch(images, seg.vocabulary(CLASSES, templates=TEMPLATES, experts=experts))
    plain = seg.segment_batch(images, seg.vocabulary(CLASSES, templates=TEMPLATES))
    assert any((a.labels != b.labels).any() for a, b in zip(fused, plain))
    with pytest.raises(ValueError, match="top_k"):
        floss.rank_templates(seg, images, CLASSES, TEMPLATES, top_k=0)


def _image_of(short: int, long: int) -> np.ndarray:
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((long, short)))


# MaskCLIP at 512 on a 4:3 photo: 512 x 682 (1376 patches, above max_patches' 1344, whole
# under its official protocol) padded and stretched. NACLIP on VOC (whole image): 336 x 505,
# the remainder columns dropped and the floor grid stretched. NACLIP's slide: averaged crops.
@pytest.mark.parametrize(
    "method, dataset, image",
    [("maskclip", None, (480, 640)), ("naclip", "voc21", (333, 500)), ("naclip", None, (333, 500))],
)
def test_floss_scores_the_tiles_labelling_runs(tiny, method, dataset, image):
    """FLOSS ranks each template on the forwards labelling runs (the method's plan: its input
    fit and its whole-image limit), decided as labelling decides: a template's predicted
    pixels per class are those of the image labelled with that template alone."""
    seg = tiny.variant(method=method, dataset=dataset)
    photo = _image_of(*image)
    shapes = {"floss": [], "labels": []}
    forward = seg.dense_features
    seen = shapes["floss"]

    def recording(pixels, vocab=None):
        seen.extend([tuple(pixels.shape[-2:])] * pixels.shape[0])  # one per tile
        return forward(pixels, vocab)

    seg.dense_features = recording  # instance attribute: both paths call it
    experts = floss.rank_templates(seg, [photo], CLASSES, TEMPLATES[:3], top_k=1)
    seen = shapes["labels"]
    labels = [
        seg.segment(photo, seg.vocabulary(CLASSES, templates=[t])).labels for t in TEMPLATES[:3]
    ]
    # The same tiles, each run once for all templates (labelling: once per template).
    assert sorted(shapes["floss"] * 3) == sorted(shapes["labels"])
    for t, predicted in enumerate(labels):
        for c in range(len(CLASSES)):
            count = int((predicted == c).sum())
            assert abs(experts.pixels[c][t] - count) <= max(2, count // 2000), (t, c)
