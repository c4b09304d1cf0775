"""Building Meta's model: the sizes are the builder's, the CPU paths are scoped, the BPE file is
the one SAM 3 reads, random weights are complete, and the TF32 switches are handled."""

from __future__ import annotations

import ast
import hashlib
import inspect
import os

import pytest
import torch

from cliptrase.sam3 import build_image_model
from cliptrase.sam3.meta import sam3_api
from cliptrase.sam3.model import (
    BPE_SHA256,
    SIZES,
    bpe_vocabulary_path,
    cpu_safe_geometry_encoder_class,
)
from cliptrase.sam3.tf32 import ieee_fp32, preserved_tf32_flags, sam3_tf32, tf32_flags


def _builder_literals(function: str) -> dict:
    """Keyword literals of the calls in one ``sam3/model_builder.py`` function."""
    sam3_api()  # imports sam3 as the package does (TF32 kept, import noise silenced)
    import sam3.model_builder

    tree = ast.parse(inspect.getsource(sam3.model_builder))
    body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    found = {}
    for node in ast.walk(body):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                try:
                    found[keyword.arg] = ast.literal_eval(keyword.value)
                except ValueError:
                    continue
    return found


def test_the_full_size_is_model_builders():
    full = SIZES["full"]
    vit = _builder_literals("_create_vit_backbone")
    assert (vit["img_size"], vit["pretrain_img_size"], vit["patch_size"]) == (
        full.resolution,
        full.pretrain_resolution,
        full.patch,
    )
    assert (vit["embed_dim"], vit["depth"], vit["num_heads"], vit["mlp_ratio"]) == (
        full.vit_width,
        full.vit_depth,
        full.vit_heads,
        full.vit_mlp_ratio,
    )
    assert vit["global_att_blocks"] == full.global_blocks and vit["window_size"] == full.window
    assert vit["drop_path_rate"] == full.drop_path
    text = _builder_literals("_create_text_encoder")
    assert (text["d_model"], text["width"], text["heads"], text["layers"]) == (
        full.d_model,
        full.text_width,
        full.text_heads,
        full.text_layers,
    )
    encoder = _builder_literals("_create_transformer_encoder")
    assert (encoder["num_layers"], encoder["dim_feedforward"], encoder["num_heads"]) == (
        full.encoder_layers,
        full.ffn,
        full.heads,
    )
    decoder = _builder_literals("_create_transformer_decoder")
    assert (decoder["num_layers"], decoder["num_queries"], decoder["resolution"]) == (
        full.decoder_layers,
        full.queries,
        full.resolution,
    )
    assert decoder["stride"] == full.patch
    assert _builder_literals("_create_geometry_encoder")["num_layers"] == full.geometry_layers
    assert full.mask_size == 288 and full.grid == 72


def test_the_bpe_file_is_open_clips_copy_of_sam3s_vocabulary():
    path = bpe_vocabulary_path()
    assert os.path.basename(path) == "bpe_simple_vocab_16e6.txt.gz"
    assert os.sep + "open_clip" + os.sep in path
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == BPE_SHA256


def test_random_weights_are_complete_and_seeded(tiny):
    model = tiny.model
    for name, value in model.state_dict().items():
        if value.is_floating_point() or value.is_complex():
            assert torch.isfinite(value).all(), name
    text = model.backbone.language_backbone.encoder
    assert 0.005 < text.positional_embedding.std().item() < 0.02
    state = torch.random.get_rng_state()
    again = build_image_model(SIZES["tiny"], seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG untouched
    for (name, a), (_, b) in zip(again.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    other = build_image_model(SIZES["tiny"], seed=1)
    assert not torch.equal(
        other.state_dict()["transformer.decoder.query_embed.weight"],
        model.state_dict()["transformer.decoder.query_embed.weight"],
    )


def test_the_cpu_model_has_no_cuda_hard_codes(tiny):
    model = tiny.model
    assert model.transformer.decoder.compilable_cord_cache is None or (
        model.transformer.decoder.compilable_cord_cache[0].device.type == "cpu"
    )
    assert isinstance(model.geometry_encoder, sam3_api().SequenceGeometryEncoder)
    assert type(model.geometry_encoder) is cpu_safe_geometry_encoder_class()
    assert model.backbone.vision_backbone.position_encoding.cache == {} or all(
        t.device.type == "cpu"
        for t in model.backbone.vision_backbone.position_encoding.cache.values()
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="pin_memory works with a CUDA runtime")
def test_pin_memory_is_skipped_only_inside_the_geometry_encoder(tiny, photos):
    original = torch.Tensor.pin_memory
    vocab = tiny.vocabulary(["cat"])
    tiny.segment_batch(photos[:1], vocab)  # runs _encode_boxes (0 boxes) on the CPU
    assert torch.Tensor.pin_memory is original
    with pytest.raises(RuntimeError):
        torch.zeros(1).pin_memory()  # no global patch: still CUDA's


def test_weights_stay_as_built_and_forwards_record_no_graph(tiny, photos):
    """As in the official runs: frozen weights would stop torch.matmul folding the seq-first
    [HW, K, C] projections into one mm (a bmm over HW copies, 6x slower in the geometry
    encoder on the CPU); inference_mode keeps autograd out of every forward."""
    params = list(tiny.model.parameters())
    assert params and all(p.requires_grad for p in params)
    vocab = tiny.vocabulary(["cat", "grass"])
    with torch.autograd.graph.saved_tensors_hooks(_no_saved_tensors, _no_saved_tensors):
        tiny.segment_batch(photos[:2], vocab)
    assert all(p.grad is None for p in params)


def _no_saved_tensors(tensor):
    raise AssertionError("a forward saved a tensor for backward")


def test_preserved_tf32_flags_undo_what_sam3s_import_does():
    before = tf32_flags()
    with preserved_tf32_flags():
        torch.backends.cuda.matmul.allow_tf32 = True  # model_builder.py:46-55
        torch.backends.cudnn.allow_tf32 = True
        assert tf32_flags()["cuda.matmul"] == "tf32"
    assert tf32_flags() == before


def test_tf32_contexts_are_no_ops_off_cuda():
    before = tf32_flags()
    with sam3_tf32(torch.device("cpu")), ieee_fp32(torch.device("cpu")):
        assert tf32_flags() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sam3_forwards_get_tf32_and_the_process_keeps_its_flags():
    device = torch.device("cuda")
    before = tf32_flags()
    with sam3_tf32(device):
        if torch.cuda.get_device_properties(0).major >= 8:
            assert torch.get_float32_matmul_precision() == "high"
            assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    with ieee_fp32(device):
        assert torch.get_float32_matmul_precision() == "highest"
    assert tf32_flags() == before


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CLIPTRASE_SAM3_FULL") != "1",
    reason="the 840M-parameter model (3.4 GB; ~2 min on one CPU core): set CLIPTRASE_SAM3_FULL=1",
)
def test_the_full_model_builds_and_grounds_at_1008():
    from cliptrase.sam3 import load_sam3_segmentor
    from cliptrase.sam3.grounding import ground, image_features

    seg = load_sam3_segmentor("sam3", pretrained=None, device="auto")
    assert sum(p.numel() for p in seg.model.parameters()) == 840_509_750
    # Meta's checkpoint has 1156 detector tensors: these plus the 22 of the SAM 2 neck.
    assert len(seg.model.state_dict()) == 1134
    vocab = seg.vocabulary(["cat", "sky"])
    pixels = torch.zeros(1, 3, 1008, 1008, device=seg.device)
    with torch.inference_mode(), seg._forward():
        features = image_features(seg.model, pixels)
        assert [tuple(x.shape[-2:]) for x in features["backbone_fpn"]] == [
            (288, 288),
            (144, 144),
            (72, 72),
        ]
        out = ground(
            seg.model,
            features,
            [0, 0],
            torch.arange(2, device=seg.device),
            seg._prompt_text(vocab),
        )
    assert out["pred_masks"].shape == (2, 200, 288, 288)
    assert out["semantic_seg"].shape == (2, 1, 288, 288)
    assert out["presence_logit_dec"].shape == (2, 1)
