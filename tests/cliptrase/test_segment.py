"""Whole-image behaviour: original size, batching, windows, confidence, vocabularies, bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import cliptrase
from cliptrase import InvalidImageError, SegmentorConfig, VocabularyError, inference
from cliptrase.head import confidence_of, pool_rows

from .conftest import DEVICES, on_device

CLASSES = ["person", "rocket", "cat", "coffee cup"]


@pytest.fixture(scope="module")
def vocab(tiny):
    return tiny.vocabulary(CLASSES, background=["background", "sky"])


def test_segment_covers_the_whole_image_at_original_size(tiny, vocab, astronaut):
    odd = astronaut[:301, :457]  # odd size: needs padding to the patch size
    result = tiny.segment(odd, vocab)
    assert result.labels.shape == (301, 457) and result.labels.dtype == np.uint8
    assert result.confidence.shape == (301, 457) and result.confidence.dtype == np.float32
    assert 0 <= result.confidence.min() and result.confidence.max() <= 1
    assert result.labels.max() < len(vocab.names)
    assert result.names == ["person", "rocket", "cat", "coffee cup", "background"]
    assert result.random_weights and result.windows == 1


def test_segment_matches_segment_pixels_on_the_padded_image(tiny, vocab, chelsea):
    """No centre crop: the whole image is resized (short side 336), padded, run, unpadded."""
    assert tiny.prepare(chelsea).resized == (336, 505)  # 300 x 451 -> short side 336
    image = Image.fromarray(chelsea).resize((505, 336), Image.BICUBIC)  # already at processing size
    prepared = tiny.prepare(image)
    assert prepared.resized == (336, 505) and prepared.pixels.shape == (3, 336, 512)
    expected = tiny.segment_pixels(prepared.pixels[None], vocab)[0, :, :505].numpy()
    np.testing.assert_array_equal(tiny.segment(image, vocab).labels, expected)


def test_confidence_is_the_probability_of_the_chosen_label(tiny, chelsea):
    vocab = tiny.vocabulary(["cat", "grass"])
    seg = type(tiny)(
        tiny.clip,
        tiny.model_name,
        tiny.weights,
        method=tiny.method.with_options(refiner=None, correlation_block=None),
    )
    pixels = seg.prepare(chelsea).pixels[None]
    logits = seg.dense_features(pixels).patch_logits(vocab)
    probs = torch.softmax(
        torch.nn.functional.interpolate(logits, size=pixels.shape[-2:], mode="bilinear"), dim=1
    )
    processed = seg._process(pixels, vocab)
    confidence = seg._confidence(processed.logits, processed.pred, vocab)
    np.testing.assert_allclose(confidence[0], probs.max(dim=1).values[0].numpy(), atol=1e-6)
    assert confidence.min() >= 0.5  # two classes: the argmax has at least half the mass
    # Stored as round(255 c) at the original size: the same map, stretched and quantised.
    result = seg.segment(chelsea, vocab)
    assert result.confidence_u8.dtype == np.uint8 and result.confidence_u8.min() >= 127


def pooled_confidence(logits, pred, row_labels, num_labels, num_classes, temperature):
    """Spec section 6 literally: softmax over the rows, background words summed into one
    channel (synonyms pooled), the chosen label's channel."""
    probs = torch.softmax(logits.float() / temperature, dim=1)
    c = num_classes
    if torch.equal(row_labels[:c], torch.arange(c)) and bool((row_labels[c:] == c).all()):
        if probs.shape[1] > c:
            probs = torch.cat([probs[:, :c], probs[:, c:].sum(dim=1, keepdim=True)], dim=1)
    else:
        probs = pool_rows(probs, row_labels, num_labels, "sum")
    return probs.gather(1, pred.unsqueeze(1))[:, 0].clamp_(0, 1)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize(
    "row_labels,num_classes,plain_rows",
    # plain, background words, synonyms
    [([0, 1, 2], 3, True), ([0, 1, 2, 3, 3, 3], 3, True), ([0, 1, 1, 2, 3, 3], 3, False)],
)
def test_confidence_equals_the_pooled_probabilities_bit_for_bit(
    row_labels, num_classes, plain_rows, temperature
):
    generator = torch.Generator().manual_seed(len(row_labels))
    row_labels = torch.tensor(row_labels)
    num_labels = int(row_labels.max()) + 1
    logits = 4 * torch.randn(2, len(row_labels), 37, 53, generator=generator)
    pred = torch.randint(0, num_labels, (2, 37, 53), generator=generator)
    got = confidence_of(logits, pred, row_labels, num_labels, num_classes, temperature)
    expected = pooled_confidence(logits, pred, row_labels, num_labels, num_classes, temperature)
    assert torch.equal(got, expected)
    assert bool((pred == num_labels - 1).any())  # the pooled background channel was read
    # The caller's word for the rows' form (no device read of row_labels) changes nothing.
    told = confidence_of(
        logits, pred, row_labels, num_labels, num_classes, temperature, plain_rows=plain_rows
    )
    assert torch.equal(told, expected)


@pytest.mark.parametrize("synonyms", [None, [["kitten", "tabby"], [], ["lawn"]]])
def test_the_segmentors_confidence_pools_synonyms_with_labels_kept_on_its_device(tiny, synonyms):
    vocab = tiny.vocabulary(["cat", "dog", "grass"], ["wall", "sky"], synonyms=synonyms)
    generator = torch.Generator().manual_seed(3)
    rows = len(vocab.row_labels)
    logits = 4 * torch.randn(2, rows, 29, 31, generator=generator)
    pred = torch.randint(0, vocab.num_labels, (2, 29, 31), generator=generator)
    got = tiny._confidence(logits, pred, vocab)
    expected = pooled_confidence(logits, pred, vocab.row_labels, vocab.num_labels, 3, 1.0)
    assert torch.equal(got, expected)
    # Copied to the device once per vocabulary, not per batch.
    on_device = tiny._device_vocab(vocab)
    assert tiny._device_vocab(vocab) is on_device
    assert on_device.row_labels.device == tiny.device
    assert torch.equal(on_device.row_labels.cpu(), vocab.row_labels)
    assert on_device.expert_labels.device == tiny.device and on_device.expert_labels.numel() == 0


def test_batch_equals_one_at_a_time(tiny, vocab, astronaut, chelsea):
    images = [astronaut, chelsea, astronaut[:200, :300], chelsea[::-1].copy()]
    batched = tiny.segment_batch(images, vocab, batch_size=3)
    for image, result in zip(images, batched):
        single = tiny.segment(image, vocab)
        np.testing.assert_array_equal(result.labels, single.labels)
        np.testing.assert_allclose(result.confidence, single.confidence, atol=1 / 255 + 1e-6)


def test_panoramas_use_sliding_windows(tiny, vocab, astronaut):
    panorama = np.concatenate([astronaut, astronaut[:, ::-1], astronaut], axis=1)[
        :128
    ]  # 128 x 1536
    result = tiny.segment(panorama, vocab)
    assert result.labels.shape == (128, 1536)
    assert result.windows > 1
    whole = type(tiny)(
        tiny.clip, tiny.model_name, tiny.weights, config=SegmentorConfig(max_patches=10**6)
    )
    assert whole.segment(panorama, vocab).windows == 1


def test_labels_become_uint16_above_255_labels(tiny, astronaut):
    names = [f"class {i}" for i in range(300)]
    vocab = tiny.vocabulary(names, templates=["a photo of a {}."])
    result = tiny.segment(astronaut[:64, :64], vocab)
    assert result.labels.dtype == np.uint16 and result.labels.max() < 300


def test_vocabularies_are_cached_and_ordered(tiny):
    a = tiny.vocabulary(["cat", "dog"], background=["wall"])
    assert tiny.vocabulary(["cat", "dog"], background=["wall"]) is a
    b = tiny.vocabulary(["dog", "cat"], background=["wall"])
    assert b is not a and b.names == ["dog", "cat", "background"]
    torch.testing.assert_close(b.embeddings[0], a.embeddings[1])
    assert a.background_label == 2 and tiny.vocabulary(["cat"]).background_label is None


@pytest.mark.parametrize(
    ("classes", "background", "message"),
    [
        ([], None, "empty"),
        (["cat", "cat"], None, "duplicate"),
        (["cat"], ["cat"], "duplicate"),
        (["cat", " "], None, "non-empty"),
        ("cat", None, "lists of strings"),
        (["background"], ["wall"], "both a class name"),
    ],
)
def test_bad_vocabularies(tiny, classes, background, message):
    with pytest.raises(VocabularyError, match=message):
        tiny.vocabulary(classes, background=background)


def test_bad_templates(tiny):
    with pytest.raises(ValueError, match="must contain"):
        tiny.vocabulary(["cat"], templates=["a photo"])


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((32, 32), np.uint8), "H x W x 3"),
        (np.zeros((32, 32, 4), np.uint8), "H x W x 3"),
        (np.zeros((32, 32, 3), np.float32), "uint8"),
        (np.zeros((8, 400, 3), np.uint8), "8 pixels|400x8"),
        (Image.new("RGB", (1, 1)), "1x1"),
        ("photo.jpg", "PIL image"),
    ],
)
def test_bad_images(tiny, vocab, image, message):
    with pytest.raises(InvalidImageError, match=message):
        tiny.segment(image, vocab)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "I;16", "LA"])
def test_non_rgb_pil_images_are_converted(tiny, vocab, astronaut, mode):
    image = (
        Image.fromarray(astronaut[:96, :80]).convert(mode)
        if mode != "I;16"
        else Image.new("I;16", (80, 96), 300)
    )
    result = tiny.segment(image, vocab)
    assert result.labels.shape == (96, 80)


@pytest.mark.parametrize(
    "shape", [(1, 3, 225, 224), (1, 3, 8, 16), (3, 224, 224), (1, 1, 224, 224)]
)
def test_bad_pixel_tensors(tiny, vocab, shape):
    with pytest.raises(InvalidImageError):
        tiny.segment_pixels(torch.zeros(shape), vocab)


def test_half_precision_on_cpu_falls_back_to_fp32(caplog):
    with caplog.at_level(logging.WARNING, logger="cliptrase"):
        seg = cliptrase.load_segmentor(
            "ViT-Tiny-16-test", pretrained=None, device="cpu", precision="bf16"
        )
    assert seg.precision == "fp32" and "needs a GPU" in caplog.text
    with pytest.raises(ValueError, match="precision"):
        cliptrase.load_segmentor("ViT-Tiny-16-test", pretrained=None, precision="int4")


def test_random_weights_are_reproducible_and_announced(caplog, astronaut):
    with caplog.at_level(logging.WARNING, logger="cliptrase"):
        a = cliptrase.load_segmentor("ViT-Tiny-16-test", pretrained=None, seed=7)
    assert "RANDOM weights" in caplog.text
    b = cliptrase.load_segmentor("ViT-Tiny-16-test", pretrained=None, seed=7)
    c = cliptrase.load_segmentor("ViT-Tiny-16-test", pretrained=None, seed=8)
    assert a.weights.identity == "random-init:seed=7" and a.random_weights
    for key, value in a.clip.state_dict().items():
        assert torch.equal(value, b.clip.state_dict()[key])
    assert not torch.equal(a.clip.visual.proj, c.clip.visual.proj)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("size", [(336, 336), (331, 507), (17, 1023), (1, 1)])
def test_prepared_pixels_are_torchvisions_to_tensor_normalize_and_pad_bit_for_bit(name, size):
    """The product writes the normalised pixels straight into the padded tensor; odd widths
    put vector-loop tails at every row end, where a different code path could round apart."""
    import skimage.data
    import torch.nn.functional as F
    from torchvision.transforms import functional as TF

    from cliptrase.preprocess import normalised_into

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size[::-1])
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    padded = (size[0] + 16 - size[0] % 16 if size[0] % 16 else size[0], size[1] + 5)
    expected = TF.normalize(TF.to_tensor(image), mean, std)
    expected = F.pad(expected, (0, padded[1] - size[1], 0, padded[0] - size[0]))
    assert torch.equal(normalised_into(image, padded, mean, std), expected)


def _chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("name", "size", "original"),
    [
        ("astronaut", (1080, 1920), None),
        ("chelsea", (300, 451), None),
        ("coffee", (400, 600), (1600, 2400)),  # decoded at 1/4 of the size it stands for
        ("camera", (512, 300), None),  # portrait, grayscale photo
    ],
)
def test_prepare_pixels_matches_prepare_up_to_the_resize_kernel(tiny, name, size, original, device):
    """The tensor path (a JPEG decoded on the device) gives the same sizes and padding as the
    PIL path, and its resize differs from Pillow's bicubic by at most 2 levels of 255 on few
    values: the difference ``SourceSpec.gpu_decode`` is hashed for."""
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size[::-1])
    want = tiny.prepare(image, original_size=original)
    got = tiny.prepare_pixels(_chw(image).to(device), original_size=original)
    assert got.pixels.device.type == device and got.pixels.dtype == torch.float32
    assert (got.resized, got.original) == (want.resized, want.original)
    assert got.pixels.shape == want.pixels.shape
    h, w = want.resized
    assert not got.pixels[:, h:].any() and not got.pixels[:, :, w:].any()  # padding: zeros
    std = torch.tensor(tiny.std).view(3, 1, 1)
    levels = ((got.pixels.cpu() - want.pixels) * std * 255).abs()[:, :h, :w]
    assert levels.max() <= 2.01
    changed = (levels > 0.5).float().mean().item()
    assert changed <= (0.01 if device == "cpu" else 0.2), changed


@pytest.mark.parametrize(
    ("name", "size", "original"),
    [
        ("astronaut", (480, 640), None),
        ("coffee", (270, 480), (1080, 1920)),  # a 1/4 JPEG draft
        ("camera", (512, 300), None),  # grayscale (mode L): converted to RGB first
    ],
)
def test_torch_resize_prepares_as_prepare_pixels_does(tiny, name, size, original):
    """``SegmentorConfig(resize="torch")``: ``prepare`` of a PIL image is, bit for bit,
    ``prepare_pixels`` of its pixels on the CPU (the resize bounded against Pillow's above);
    the default stays Pillow's."""
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).resize(size[::-1])
    fast = tiny.variant(config=SegmentorConfig(resize="torch"))
    assert tiny.config.resize == "pillow"
    got = fast.prepare(image, original_size=original)
    want = tiny.prepare_pixels(_chw(image), original_size=original)
    assert (got.resized, got.original) == (want.resized, want.original)
    assert torch.equal(got.pixels, want.pixels)
    assert not torch.equal(got.pixels, tiny.prepare(image, original_size=original).pixels)


def test_an_unknown_resize_is_refused():
    with pytest.raises(ValueError, match=r"resize must be one of \('pillow', 'torch'\)"):
        SegmentorConfig(resize="cv2")


def test_prepare_pixels_refuses_what_is_not_a_uint8_rgb_tensor(tiny):
    good = torch.zeros(3, 40, 40, dtype=torch.uint8)
    assert tiny.prepare_pixels(good).resized == (336, 336)
    cases = [
        (good.float(), "must be uint8"),
        (good[0], r"\(3, H, W\) uint8 tensor, got \(40, 40\)"),
        (torch.zeros(4, 40, 40, dtype=torch.uint8), r"got \(4, 40, 40\)"),
        (np.zeros((40, 40, 3), np.uint8), "got ndarray"),
        (torch.zeros(3, 8, 40, dtype=torch.uint8), "smallest supported side is 16"),
    ]
    for pixels, message in cases:
        with pytest.raises(InvalidImageError, match=message):
            tiny.prepare_pixels(pixels)


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_prepared_images_batch_with_pil_prepared_ones(tiny, vocab, device):
    """Prepared tensors from prepare_pixels (on the device: a GPU-decoded JPEG) batch with
    PIL-prepared ones (on the host: Pillow's fallbacks) of the same size; each image's labels
    are those it gets alone."""
    import skimage.data

    seg = on_device(tiny, device)
    astronaut = Image.fromarray(skimage.data.astronaut()).resize((640, 480))
    coffee = Image.fromarray(skimage.data.coffee()).resize((640, 480))
    tensor_prepared = seg.prepare_pixels(_chw(astronaut).to(device))
    pil_prepared = seg.prepare(coffee)
    both = seg.segment_batch([tensor_prepared, pil_prepared], vocab)
    alone = [seg.segment_batch([p], vocab)[0] for p in (tensor_prepared, pil_prepared)]
    for together, single in zip(both, alone):
        assert together.labels.shape == (480, 640)
        np.testing.assert_array_equal(together.labels, single.labels)


def test_tiles_on_different_devices_batch_apart(tiny):
    """Same-shape tiles prepared on the host and on the device go into separate stacks (a
    stack of both raises); meta tensors stand in for the device here."""
    from types import SimpleNamespace

    def plan(*devices):
        return SimpleNamespace(tiles=[SimpleNamespace(pixels=torch.zeros(3, 32, 48, device=d))
                                      for d in devices])  # fmt: skip

    plans = [plan("cpu", "meta"), plan("meta"), plan("cpu", "cpu")]
    batches = inference.batches(plans, 8, tiny.device)
    chunks = [(chunk, pixels.device.type) for chunk, pixels, _, _ in batches]
    assert chunks == [([(0, 0), (2, 0), (2, 1)], "cpu"), ([(0, 1), (1, 0)], "meta")]


def test_fp32_means_ieee_float32_convolutions_on_a_gpu():
    """The CUDA forward at "fp32" runs inside this context: cuDNN's convolutions (the patch
    embedding) leave TF32 for IEEE float32, and the user's setting comes back after."""
    from cliptrase.segmentor import full_fp32_convolutions

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with full_fp32_convolutions():
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before
    with pytest.raises(KeyError), full_fp32_convolutions():
        raise KeyError("restored on errors too")
    assert conv.fp32_precision == before
    # What the forward enters: the context for fp32 on CUDA (no GPU needed to build it).
    from types import SimpleNamespace

    on_gpu = SimpleNamespace(precision="fp32", device=torch.device("cuda"))
    with cliptrase.Segmentor._autocast(on_gpu):
        assert conv.fp32_precision == "ieee"
    on_cpu = SimpleNamespace(precision="fp32", device=torch.device("cpu"))
    with cliptrase.Segmentor._autocast(on_cpu):
        assert conv.fp32_precision == before


def test_batch_keys_are_the_shapes_forwards_share(tiny, astronaut, chelsea):
    """Equal keys, one forward shape: whole images by their padded processing size, the
    sliding methods' crops whatever the image's size, windowed panoramas by their window."""
    images = {
        "square": astronaut,
        "square, larger": np.array(Image.fromarray(astronaut).resize((600, 600))),
        "cat": chelsea,
        "cat, a few pixels narrower": chelsea[:, :446],
    }
    keys = {name: tiny.batch_key(tiny.prepare(image)) for name, image in images.items()}
    assert keys["square"] == keys["square, larger"] != keys["cat"]
    assert keys["cat"] == keys["cat, a few pixels narrower"]  # the same patch-padded width
    (shape,) = keys["square"]
    assert shape[0] == (3, 336, 336)

    sliding = tiny.variant(method="sclip")
    crops = {sliding.batch_key(sliding.prepare(image)) for image in images.values()}
    assert len(crops) == 1 and {s[0] for s in crops.pop()} == {(3, 224, 224)}

    panorama = np.concatenate([astronaut] * 4, axis=1)[:128]  # 128 x 2048: owned windows
    (window,) = tiny.batch_key(tiny.prepare(panorama))
    assert window[0][1] == window[0][2]  # square windows, not the whole 336 x 5376 image
