"""The backbone adapter finds q/k/v by capability: open_clip's nn.MultiheadAttention blocks and
its own ``Attention`` module (``block_type="custom"``, the only kind in newer releases)."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from open_clip.model import CLIP
from open_clip.transformer import Attention, CustomResidualAttentionBlock

import cliptrase
from cliptrase import UnsupportedModelError


def _custom_twin(seg) -> CLIP:
    """The same weights in a CLIP whose vision blocks are CustomResidualAttentionBlock."""
    cfg = copy.deepcopy(open_clip.get_model_config(seg.model_name))
    cfg["vision_cfg"]["block_type"] = "custom"
    twin = CLIP(**cfg)
    missing, unexpected = twin.load_state_dict(seg.clip.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("visual.")]
    assert isinstance(twin.visual.transformer.resblocks[0], CustomResidualAttentionBlock)
    assert isinstance(twin.visual.transformer.resblocks[0].attn, Attention)
    return twin.eval()


@pytest.mark.parametrize("method", ["cliptrase", "naclip", "gem"])
def test_open_clips_own_attention_blocks_give_the_same_outputs(tiny, astronaut, method):
    seg = tiny.variant(method=method)
    twin = cliptrase.Segmentor(_custom_twin(tiny), tiny.model_name, tiny.weights, method=method,
                               device="cpu")
    pixels = seg.prepare(astronaut).pixels[None]
    a, b = seg.dense_features(pixels), twin.dense_features(pixels)
    torch.testing.assert_close(b.patch_features, a.patch_features, atol=1e-5, rtol=0)
    if a.correlation is not None:
        torch.testing.assert_close(b.correlation, a.correlation, atol=1e-5, rtol=0)
    vocab = seg.vocabulary(["person", "rocket", "grass"], ["sky"])
    same = (seg.segment(astronaut, vocab).labels == twin.segment(astronaut, vocab).labels).mean()
    assert same > 0.999


def test_attention_options_the_methods_would_drop_are_refused(tiny):
    twin = _custom_twin(tiny)
    block = twin.visual.transformer.resblocks[1]
    block.attn.ln_q = torch.nn.LayerNorm(block.attn.head_dim)
    with pytest.raises(UnsupportedModelError, match="ln_q"):
        cliptrase.Segmentor(twin, tiny.model_name, tiny.weights, device="cpu")


def test_separate_qkv_projections_are_refused(tiny):
    twin = _custom_twin(tiny)
    del twin.visual.transformer.resblocks[0].attn.in_proj_weight
    twin.visual.transformer.resblocks[0].attn.in_proj_weight = None
    with pytest.raises(UnsupportedModelError, match="fused in_proj"):
        cliptrase.Segmentor(twin, tiny.model_name, tiny.weights, device="cpu")
