"""MaskCLIP, NACLIP and ResCLIP run as their official code runs them, against literal references.

The references are written from the released code's steps (chongzhou/MaskCLIP: mmseg
``backbones/vit.py``, ``configs/_base_/models/maskclip_vit16.py``, the mmseg dataset configs and
``EncoderDecoder`` whole inference; sinahmr/NACLIP: ``naclip.py`` ``forward_feature`` /
``forward_slide`` / ``predict``, PAMR at the original size; yvhangyang/ResCLIP: ``clip/model.py``
``create_patch_matrix``, ties in class-file order), with explicit loops and torch functionals,
sharing nothing with ``cliptrase`` but the model's weights (and, where named, a piece pinned by
its own test).
"""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import cliptrase
from cliptrase import METHODS, PAMR, DecisionHead, SegmentorConfig, forwards, original_pamr
from cliptrase.backbone import resampled_positional_embedding
from cliptrase.forwards import class_file_order, feedback_patch_labels
from cliptrase.fullsize import LabelRule
from cliptrase.head import decide
from cliptrase.inference import WholeImagePlan
from cliptrase.methods import method_for_dataset
from cliptrase.refine import pamr
from cliptrase.resample import LinearAxis
from cliptrase.text import Vocabulary
from cliptrase.weights import WeightsInfo

VOCAB = (["person", "cat", "grass"], ["sky", "wall"])


@pytest.fixture(scope="module")
def quick_gelu_tiny():
    """The tiny test ViT built as open_clip builds OpenAI's weights: QuickGELU, eps 1e-5."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = open_clip.create_model("ViT-Tiny-16-test", pretrained=None, force_quick_gelu=True)
    # LayerNorm weights/biases away from 1/0 so the norms' placement matters, and small
    # embeddings (variance ~1e-6 into ln_pre, as eps) so LayerNorm's eps visibly does.
    with torch.no_grad():
        for module in clip.visual.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        visual = clip.visual
        for tensor in (visual.conv1.weight, visual.class_embedding, visual.positional_embedding):
            tensor.mul_(1e-3)
    info = WeightsInfo("random", "random-init:seed=0+ln")
    return cliptrase.Segmentor(clip, "ViT-Tiny-16-test", info, method="cliptrase", device="cpu")


# ------------------------------------------------------------------ MaskCLIP: the tower
def test_maskclip_tower_has_exact_gelu_and_layer_norm_eps_1e6_on_shared_weights(quick_gelu_tiny):
    seg = quick_gelu_tiny.variant(method="maskclip")
    tower, original = seg.backbone.visual, seg.clip.visual
    for block in tower.transformer.resblocks:
        assert type(block.mlp.gelu) is torch.nn.GELU and block.mlp.gelu.approximate == "none"
    norms = [m for m in tower.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 + 2 * len(tower.transformer.resblocks)  # ln_pre, ln_post, ln_1/2
    assert all(m.eps == 1e-6 for m in norms)
    # The loaded model is untouched (text tower, other methods) and the weights are shared.
    assert all(
        type(b.mlp.gelu) is open_clip.transformer.QuickGELU for b in original.transformer.resblocks
    )
    assert all(m.eps == 1e-5 for m in original.modules() if isinstance(m, torch.nn.LayerNorm))
    for (name, a), (_, b) in zip(tower.named_parameters(), original.named_parameters()):
        assert a.data_ptr() == b.data_ptr(), name
    assert quick_gelu_tiny.variant(method="sclip").backbone.visual is original


def _ln(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, 1e-6)


@torch.no_grad()
def _ref_maskclip_patch_features(visual, pixels):
    """mmseg's VisionTransformer as MaskCLIP's config builds it, one image, by hand.

    PatchEmbed (corner padding to a patch multiple), [CLS], pos_embed resized with
    ``F.interpolate(size=grid, mode="bicubic", align_corners=False)``, pre_norm; each layer
    ``x + attn(norm1 x)``, ``x + ffn(norm2 x)`` with exact GELU, every LN eps 1e-6; the last
    layer's return_qkv path ``v = out_proj(v(norm1 x)) + x; v = v + ffn(norm2 v)``; final_norm
    on v; the head's 1x1 proj and L2 norm.
    """
    p = visual.patch_size[0]
    _, _, h, w = pixels.shape
    padded = F.pad(pixels, (0, -w % p, 0, -h % p))
    x = F.conv2d(padded, visual.conv1.weight, stride=p)[0]
    width, gh, gw = x.shape
    x = x.reshape(width, gh * gw).T
    x = torch.cat([visual.class_embedding[None], x])
    pos = visual.positional_embedding
    native = int(round((pos.shape[0] - 1) ** 0.5))
    grid = pos[1:].reshape(1, native, native, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    x = _ln(x + torch.cat([pos[:1], grid[0].reshape(width, -1).T]), visual.ln_pre)
    blocks = list(visual.transformer.resblocks)

    def ffn(block, y):
        hidden = F.gelu(y @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias)
        return hidden @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias

    for index, block in enumerate(blocks):
        attn = block.attn
        heads = attn.num_heads
        d = width // heads
        qkv = _ln(x, block.ln_1) @ attn.in_proj_weight.T + attn.in_proj_bias
        q, k, v = qkv.split(width, dim=-1)
        if index == len(blocks) - 1:
            v = v @ attn.out_proj.weight.T + attn.out_proj.bias + x
            v = v + ffn(block, _ln(v, block.ln_2))
            out = _ln(v, visual.ln_post) @ visual.proj
            out = out / out.norm(dim=-1, keepdim=True)
            return out[1:].reshape(gh, gw, -1)
        mixed = []
        for i in range(heads):
            part = slice(i * d, (i + 1) * d)
            weights = torch.softmax(q[:, part] @ k[:, part].T * d**-0.5, dim=-1)
            mixed.append(weights @ v[:, part])
        x = x + torch.cat(mixed, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias
        x = x + ffn(block, _ln(x, block.ln_2))
    raise AssertionError("unreachable")


def test_maskclip_forward_matches_mmseg_vit_with_gelu_eps_and_size_resize(quick_gelu_tiny):
    seg = quick_gelu_tiny.variant(method="maskclip")
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 80, 112)  # a 5 x 7 grid: the 14 x 14 embedding is resized
    feats = seg.dense_features(pixels).patch_features[0]
    expected = _ref_maskclip_patch_features(seg.clip.visual, pixels)
    torch.testing.assert_close(feats, expected, atol=2e-5, rtol=1e-4)
    # Each official detail matters: without it the forward is another one.
    for change in (
        dict(activation=None),
        dict(layer_norm_eps=None),
        dict(pos_embed_resize="scale_factor"),
    ):
        other = seg.variant(method=seg.method.with_options(**change))
        diff = (other.dense_features(pixels).patch_features[0] - expected).abs().max()
        assert diff > 1e-4, change


def test_pos_embed_resize_to_the_grid_is_bicubic_by_size():
    torch.manual_seed(2)
    pos = torch.randn(1 + 14 * 14, 24)
    got = resampled_positional_embedding(pos, (14, 14), (32, 43), mode="size")
    # mmseg resize_pos_embed: (1, D, 14, 14) -> interpolate(size=(32, 43), bicubic), flattened.
    grid = pos[1:].reshape(1, 14, 14, 24).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(
        grid, size=(32, 43), mode="bicubic", align_corners=False
    )
    expected = torch.cat([pos[:1], grid.flatten(2).transpose(1, 2)[0]])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    spec = resampled_positional_embedding(pos, (14, 14), (32, 43))  # CLIPtrase's (+0.1) factor
    assert (spec - expected).abs().max() > 1e-3
    assert resampled_positional_embedding(pos, (14, 14), (14, 14), mode="size") is pos


# -------------------------------------------------------------- MaskCLIP: the input
def test_maskclip_normalises_with_imagenet_mean_and_std(tiny):
    seg = tiny.variant(method="maskclip")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(512, 640, 3), dtype=np.uint8)  # already at 512
    prepared = seg.prepare(image)
    assert prepared.resized == (512, 640)
    # mmseg img_norm_cfg: mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375), RGB.
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    std = np.array([58.395, 57.12, 57.375], np.float32)
    expected = ((image.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(prepared.pixels.numpy(), expected, atol=2e-5)
    same_size = SegmentorConfig(short_side=512)
    openai = tiny.variant(method="sclip", config=same_size).prepare(image).pixels.numpy()
    assert np.abs(openai - expected).max() > 0.01  # the other presets keep CLIP's own


def _bilinear(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_maskclip_pads_then_stretches_the_padded_grid_onto_the_image(tiny, astronaut):
    seg = tiny.variant(method="maskclip", config=SegmentorConfig(short_side=40))
    vocab = seg.vocabulary(*VOCAB)
    image = astronaut[:150, :190]  # resized 40 x 50: padded to 48 x 64, a 3 x 4 grid
    prepared = seg.prepare(image)
    h, w = prepared.resized
    assert (h, w) == (40, 50)
    # EncoderDecoder whole inference: backbone on the corner-padded image, logits of the padded
    # grid resized to the (unpadded) input, then to the original size; argmax.
    unpadded = prepared.pixels[None, :, :h, :w]
    padded = F.pad(unpadded, (0, -w % 16, 0, -h % 16))
    logits = seg.dense_features(padded).patch_logits(vocab, seg.logit_scale_used)
    logits = _bilinear(_bilinear(logits, (h, w)), image.shape[:2])
    expected = decide(
        logits, vocab.row_labels, vocab.num_labels, vocab.background_label, seg.method.head
    )[0].numpy()
    result = seg.segment(image, vocab)
    assert result.windows == 1 and len(np.unique(expected)) > 1
    assert (result.labels == expected).mean() > 0.9999  # float ties at most
    cropped = seg.variant(method=seg.method.with_options(input_fit="pad_crop"))
    assert (cropped.segment(image, vocab).labels != expected).mean() > 0.01


# ----------------------------------------------------------------------------- NACLIP
def _ref_naclip_whole_predict(seg, vocab, image, with_pamr):
    """naclip.py predict with slide_crop=0: forward_feature on the unpadded image (the patch
    conv drops the remainder), logits of the floor grid resized to the input, then to the
    original size; PAMR(10, (8, 16)) there on the bilinearly resized image; the head."""
    prepared = seg.prepare(image)
    h, w = prepared.resized
    unpadded = prepared.pixels[None, :, :h, :w]
    conv = seg.backbone.visual.conv1
    floor = unpadded[:, :, : h // 16 * 16, : w // 16 * 16]
    # What "drops the remainder" means: the stride-16 conv never reads those pixels.
    torch.testing.assert_close(conv(unpadded), conv(floor), atol=0, rtol=0)
    logits = seg.dense_features(floor).patch_logits(vocab, 40.0)
    original = image.shape[:2]
    logits = _bilinear(_bilinear(logits, (h, w)), original)
    if with_pamr:  # pamr() itself is pinned by test_methods.test_pamr_matches_a_pixel_loop_reference
        logits = pamr(_bilinear(unpadded, original), logits, 10, (8, 16))
    return decide(
        logits, vocab.row_labels, vocab.num_labels, vocab.background_label, seg.method.head
    )[0].numpy()


@pytest.mark.parametrize("with_pamr", [True, False])
def test_naclip_whole_image_drops_the_remainder_and_stretches(tiny, astronaut, with_pamr):
    method = method_for_dataset("naclip", "voc21")  # VOC: whole images (slide_crop=0)
    assert method.crop is None and method.pamr == PAMR(10, (8, 16))
    if not with_pamr:
        method = method.with_options(pamr=None)
    seg = tiny.variant(method=method)
    vocab = seg.vocabulary(*VOCAB)
    # At short side 336 already (PAMR runs at the original size officially, at the processing
    # size here: the two coincide), 500 wide: 4 remainder columns.
    image = np.ascontiguousarray(astronaut[:336, :500])
    expected = _ref_naclip_whole_predict(seg, vocab, image, with_pamr)
    result = seg.segment(image, vocab)
    assert result.windows == 1 and len(np.unique(expected)) > 1
    assert (result.labels == expected).mean() > 0.9999
    padded = seg.variant(method=seg.method.with_options(input_fit="pad_crop"))
    assert (padded.segment(image, vocab).labels != expected).mean() > 0.005


@pytest.mark.parametrize("with_pamr", [True, False])
def test_naclip_whole_image_runs_pamr_at_the_original_size(tiny, astronaut, with_pamr):
    """naclip.py predict on a photo larger than the processing size: the logits and the
    normalised image resized to the original size, PAMR there, the head there."""
    method = method_for_dataset("naclip", "voc21")
    if not with_pamr:
        method = method.with_options(pamr=None)
    seg = tiny.variant(method=method)
    vocab = seg.vocabulary(*VOCAB)
    image = np.ascontiguousarray(astronaut[:420, :500])  # 336 x 400 processing, 5:4 up
    assert seg.prepare(image).resized == (336, 400)
    expected = _ref_naclip_whole_predict(seg, vocab, image, with_pamr)
    result = seg.segment(image, vocab)
    assert result.labels.shape == image.shape[:2] and len(np.unique(expected)) > 1
    assert (result.labels == expected).mean() > 0.9999
    if with_pamr:  # PAMR at the processing size (before) labels otherwise
        before = seg.variant(method=seg.method.with_options(pamr_resolution="processing"))
        assert (before.segment(image, vocab).labels != expected).mean() > 0.001


def _ref_naclip_slide_predict(seg, vocab, image):
    """naclip.py forward_slide (224/112 crops of the resized image, each crop's logits resized
    to the crop, summed, divided by the counts), then predict: the averaged logits and the
    normalised image resized bilinearly to the original size, PAMR(10, (8, 16)) there, the
    head."""
    prepared = seg.prepare(image)
    h, w = prepared.resized
    pixels = prepared.pixels[None, :, :h, :w]
    logits = torch.zeros(1, len(vocab.prompts), h, w)
    count = torch.zeros(1, 1, h, w)
    for hi in range(max(h - 224 + 111, 0) // 112 + 1):
        for wi in range(max(w - 224 + 111, 0) // 112 + 1):
            y2, x2 = min(hi * 112 + 224, h), min(wi * 112 + 224, w)
            y1, x1 = max(y2 - 224, 0), max(x2 - 224, 0)
            crop = pixels[:, :, y1:y2, x1:x2]
            crop_logits = seg.dense_features(crop).patch_logits(vocab, 40.0)
            logits[:, :, y1:y2, x1:x2] += _bilinear(crop_logits, crop.shape[-2:])
            count[:, :, y1:y2, x1:x2] += 1
    original = image.shape[:2]
    logits = pamr(_bilinear(pixels, original), _bilinear(logits / count, original), 10, (8, 16))
    return decide(
        logits, vocab.row_labels, vocab.num_labels, vocab.background_label, seg.method.head
    )[0].numpy()


def test_naclip_sliding_windows_run_pamr_at_the_original_size(tiny, astronaut):
    seg = tiny.variant(method="naclip")
    vocab = seg.vocabulary(*VOCAB)
    image = np.ascontiguousarray(astronaut[:380, :475])  # 336 x 420: 2 x 3 crops
    expected = _ref_naclip_slide_predict(seg, vocab, image)
    result = seg.segment(image, vocab)
    assert result.windows == 6 and len(np.unique(expected)) > 1
    assert (result.labels == expected).mean() > 0.9999
    before = seg.variant(method=seg.method.with_options(pamr_resolution="processing"))
    assert (before.segment(image, vocab).labels != expected).mean() > 0.001
    # The product's old behaviour (labels decided at the processing size) keeps its PAMR there.
    old = seg.variant(config=SegmentorConfig(resolution="processing"))
    assert not old.pamr_at_original and seg.pamr_at_original


def test_pamr_at_the_original_size_in_strips_is_one_pamr_over_the_whole_image(monkeypatch):
    """Strips with PAMR's reach of extra rows, and channels a few at a time, give what one PAMR
    over the whole stretched map gives, and the head's labels on it (``area_thd`` counted over
    each whole image first)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 20, 30, generator=generator) * 3
    image = torch.randn(2, 3, 20, 30, generator=generator)
    refine = PAMR(3, (1, 2))  # reach 6 rows
    original = (47, 61)
    rows, cols = LinearAxis.build(20, 47, "cpu"), LinearAxis.build(30, 61, "cpu")
    whole = refine(_bilinear(image, original), _bilinear(logits, original))
    monkeypatch.setattr(original_pamr, "REFINED_STRIP_ELEMENTS", 2 * 5 * 61 * 9)  # 9 rows
    monkeypatch.setattr(original_pamr, "PAMR_CHUNK_ELEMENTS", 2 * 2 * 61 * 21)  # 2 channels
    strips = list(original_pamr.refined_strips(logits, image, rows, cols, refine))
    assert len(strips) == 6 and all(s.shape[:2] == (2, 5) for *_, s in strips)
    torch.testing.assert_close(torch.cat([s for *_, s in strips], dim=2), whole, atol=1e-5, rtol=0)
    head = DecisionHead(prob_thd=0.4, area_thd=0.2)
    row_labels = torch.tensor([0, 1, 2, 3, 3])  # two background rows: label 3
    rule = LabelRule(row_labels, 4, 3, head)
    labels = original_pamr.refined_labels(logits, image, rows, cols, refine, rule)
    got = torch.cat([part for *_, part in labels], dim=1)
    expected = decide(whole, row_labels, 4, 3, head)
    assert torch.equal(got, expected)
    assert len(expected.unique()) > 2


def test_naclip_labels_are_the_same_in_strips_of_any_size(monkeypatch, tiny, astronaut):
    seg = tiny.variant(method=method_for_dataset("naclip", "voc21"))
    vocab = seg.vocabulary(*VOCAB)
    images = [np.ascontiguousarray(astronaut[:420, :500]), astronaut[:380, :450].copy()]
    whole = seg.segment_batch(images, vocab)
    monkeypatch.setattr(original_pamr, "REFINED_STRIP_ELEMENTS", len(vocab.prompts) * 500 * 64)
    monkeypatch.setattr(original_pamr, "PAMR_CHUNK_ELEMENTS", 3 * 500 * 400)
    strips = seg.segment_batch(images, vocab)
    for a, b in zip(whole, strips):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.confidence_map, b.confidence_map)


def test_naclip_runs_pamr_by_default_and_the_papers_numbers_without(tiny, astronaut):
    assert METHODS["naclip"].pamr == PAMR(steps=10, dilations=(8, 16))
    assert METHODS["naclip"].with_options(pamr=None).pamr is None
    image = np.ascontiguousarray(astronaut[:336, :448])
    default = tiny.variant(method="naclip")
    paper = tiny.variant(method=METHODS["naclip"].with_options(pamr=None))
    vocab = default.vocabulary(*VOCAB)
    assert (default.segment(image, vocab).labels != paper.segment(image, vocab).labels).any()
    # Only NACLIP's preset changed: SCLIP's stays without (its released default).
    assert METHODS["sclip"].pamr is None


# -------------------------------------------------------------- whole vs window
def _tiles(seg, size):
    prepared = seg.prepare(np.zeros((*size, 3), np.uint8))
    plan = WholeImagePlan.build(
        prepared,
        seg.patch_size,
        seg.config,
        input_fit=seg.method.input_fit,
        max_patches=seg.whole_patch_limit,
    )
    grid = [tile.pixels.shape[-2] // 16 * (tile.pixels.shape[-1] // 16) for tile in plan.tiles]
    return len(plan.tiles), grid


def test_the_official_whole_image_protocols_are_not_windowed(tiny):
    maskclip = tiny.variant(method="maskclip")
    assert maskclip.config.max_patches == 1344
    assert _tiles(maskclip, (480, 640)) == (1, [32 * 43])  # 512 x 682: 1376 patches, whole
    context = tiny.variant(method=method_for_dataset("maskclip", "context60"))
    assert context.config.short_side == 520
    assert _tiles(context, (375, 500)) == (1, [33 * 44])  # 520 x 693: 1452 patches, whole
    # mmseg's Resize (2048, 512): a panorama's long side is capped, and it still runs whole.
    assert maskclip.prepare(np.zeros((100, 1000, 3), np.uint8)).resized == (204, 2048)
    assert _tiles(maskclip, (100, 1000))[0] == 1
    # The memory guard stays for inputs past the official protocol's sizes ...
    big = tiny.variant(method="maskclip", config=SegmentorConfig(short_side=1024))
    assert _tiles(big, (480, 640))[0] > 1
    # ... and for every method without an official whole-image resize (CLIPtrase unchanged).
    cliptrase_seg = tiny.variant(method="cliptrase", config=SegmentorConfig(short_side=512))
    assert cliptrase_seg.whole_patch_limit == 1344
    assert _tiles(cliptrase_seg, (480, 640))[0] > 1


def test_maskclip_at_512_on_a_4_3_image_is_labelled_in_one_forward(tiny):
    seg = tiny.variant(method="maskclip")
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    result = seg.segment(image, seg.vocabulary(*VOCAB))
    assert result.windows == 1 and result.labels.shape == (480, 640)


# ----------------------------------------------------------------------------- ResCLIP
def test_resclip_feedback_ties_follow_the_official_class_file_order():
    """create_patch_matrix: argmax over the queries, then torch.mode (the CPU's: ties to the
    smallest value) of each patch's pixels, over query indices in class-file order: line 0 the
    background words, then each class with its synonyms on its line."""
    vocab = Vocabulary(("cat", "dog"), ("sky",), torch.empty(0), (("kitty",), ()))
    assert vocab.prompts == ["cat", "dog", "sky", "kitty"]  # our rows 0..3
    # cls file: "sky" / "cat, kitty" / "dog": queries sky 0, cat 1, kitty 2, dog 3.
    assert class_file_order(vocab) == [2, 0, 3, 1]
    # Each pixel's winning row, 2 x 2 patches of 2 x 2 pixels.
    winners = torch.tensor([[1, 1, 0, 0], [2, 2, 3, 3], [3, 3, 1, 1], [1, 1, 1, 2]])
    logits = F.one_hot(winners, 4).permute(2, 0, 1)[None].float() * 10
    pixels = torch.zeros(1, 3, 4, 4)
    # top-left: dog 2, sky 2: sky (query 0) before dog (3). top-right: cat 2, kitty 2: cat (1).
    # bottom-left: kitty 2, dog 2: kitty (2). bottom-right: dog 3, sky 1: dog.
    expected = torch.tensor([[[2, 0], [3, 1]]])
    order = class_file_order(vocab)
    got = feedback_patch_labels(pixels, logits, 1.0, None, 0.0, 2, 2, query_order=order)
    assert torch.equal(got, expected)
    # In our row order the ties went to the smaller row: dog, cat, dog, dog.
    ours = feedback_patch_labels(pixels, logits, 1.0, None, 0.0, 2, 2)
    assert torch.equal(ours, torch.tensor([[[1, 0], [1, 1]]]))
    # Below the threshold every pixel is the official's query 0 (sky): our row 2.
    low = feedback_patch_labels(pixels, logits, 1.0, None, 1.0, 2, 2, query_order=order)
    assert torch.all(low == 2)


def test_class_file_order_without_background_starts_with_the_first_class():
    vocab = Vocabulary(("a", "b", "c"), (), torch.empty(0), ((), ("b2", "b3"), ("c2",)))
    assert vocab.prompts == ["a", "b", "c", "b2", "b3", "c2"]
    assert class_file_order(vocab) == [0, 1, 3, 4, 2, 5]  # "a" / "b, b2, b3" / "c, c2"


@pytest.mark.parametrize("name", ["resclip", "resclip_sclip"])
def test_resclip_feedback_reads_the_class_file_order(monkeypatch, tiny, astronaut, name):
    seg = tiny.variant(method=name)
    vocab = seg.vocabulary(["person", "rocket"], ["sky", "wall"], synonyms=[["man"], []])
    seen = []

    def recording(*args, **kwargs):
        seen.append((args[6], kwargs["query_order"]))
        return feedback_patch_labels(*args, **kwargs)

    monkeypatch.setattr(forwards, "feedback_patch_labels", recording)
    seg.dense_features(seg.prepare(astronaut[:224, :224]).pixels[None], vocab)
    # rows person 0, rocket 1, sky 2, wall 3, man 4; cls file "sky, wall" / "person, man" /
    # "rocket"; query 0 (the fallback) is our row 2.
    assert seen == [(2, [2, 3, 0, 4, 1])]
