"""Meta's SAM 3 image model, built from ``sam3``'s own classes at a size from :data:`SIZES`.

``sam3/model_builder.py:557-637`` (``build_sam3_image_model``) cannot run here as it is: it
hard-codes CUDA in three places (``position_encoding.py:47`` fills a cache on ``"cuda"``,
``decoder.py:279-282`` builds coordinates on ``"cuda"``, ``geometry_encoders.py:658-659``
pins memory on every text-only forward), reads the BPE file from a path the wheel does not
ship, and its sizes are literals. :func:`build_image_model` composes the same classes in the
same order with the builder's arguments, taking the sizes from a :class:`Sam3Size`:

* ``PositionEmbeddingSine(precompute_resolution=None)``: the builder's 1008 pre-fills entries
  for strides 4/8/16/32 of 1008 (252, 126, 63, 31), which the image path never reads (its
  levels are 288/144/72 at strides 3.5/7/14); the cache fills on first use, on the input's
  device (``position_encoding.py:88-123``). Same values.
* ``TransformerDecoder(resolution=None, stride=None)``: the box-bias coordinates are then
  computed on the first forward on the memory's device (``decoder.py:335-337``), with the
  same ``arange / size`` arithmetic.
* the geometry encoder is :func:`cpu_safe_geometry_encoder_class`'s subclass: the
  ``pin_memory()`` of ``_encode_boxes`` becomes a no-op for boxes not on CUDA, inside a
  thread-local torch function mode scoped to that call (no global patch).

Random weights (``pretrained=None``) are drawn from ``seed`` in a forked RNG on the CPU, so
every process builds the same model; the text encoder's ``torch.empty`` parameters
(``text_encoder_ve.py:196, 218``) are drawn as open_clip draws them, never left as garbage.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .meta import sam3_api

# The OpenAI CLIP BPE merges SAM 3's tokenizer reads (``sam3/assets/``, absent from the
# 0.1.4 wheel); open_clip_torch ships the same file.
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CONTEXT_LENGTH = 32  # text_encoder_ve.py:261 (VETextEncoder's default)


@dataclass(frozen=True)
class Sam3Size:
    """Every size ``model_builder.py`` hard-codes, in one place."""

    name: str
    resolution: int  # the square every image is squashed to (Sam3Processor's resolution)
    patch: int
    pretrain_resolution: int  # abs-pos table size (tiled to the grid)
    vit_width: int
    vit_depth: int
    vit_heads: int
    vit_mlp_ratio: float
    global_blocks: tuple[int, ...]  # the last must be vit_depth - 1 (vitdet.py:841)
    window: int
    drop_path: float
    d_model: int
    text_width: int
    text_heads: int
    text_layers: int
    encoder_layers: int
    decoder_layers: int
    geometry_layers: int
    heads: int  # the DETR encoder/decoder/geometry attention heads
    ffn: int
    queries: int
    dropout: float = 0.1  # the builder's (inactive in eval)

    @property
    def grid(self) -> int:
        return self.resolution // self.patch

    @property
    def mask_size(self) -> int:
        """Side of ``pred_masks``/``semantic_seg``: the neck's x4 level (288 at 1008)."""
        return 4 * self.grid


SIZES: dict[str, Sam3Size] = {
    # model_builder.py: _create_vit_backbone :69-96, _create_vit_neck :99-107, encoder
    # :115-150, decoder :153-187, scoring :190-201, seg head :204-229, geometry :232-285,
    # text :486-495.
    "full": Sam3Size(
        name="full",
        resolution=1008,
        patch=14,
        pretrain_resolution=336,
        vit_width=1024,
        vit_depth=32,
        vit_heads=16,
        vit_mlp_ratio=4.625,
        global_blocks=(7, 15, 23, 31),
        window=24,
        drop_path=0.1,
        d_model=256,
        text_width=1024,
        text_heads=16,
        text_layers=24,
        encoder_layers=6,
        decoder_layers=6,
        geometry_layers=3,
        heads=8,
        ffn=2048,
        queries=200,
    ),
    # A few million parameters (most in the 49408-token embedding), built in well under a
    # second: every code path of the full model at 168 px (12x12 tokens, 48x48 masks). Its
    # preview at 2/3 (ActiveSAM's 672/1008) is 112 px, 8x8 tokens, still whole windows.
    "tiny": Sam3Size(
        name="tiny",
        resolution=168,
        patch=14,
        pretrain_resolution=56,
        vit_width=64,
        vit_depth=2,
        vit_heads=4,
        vit_mlp_ratio=4.625,
        global_blocks=(1,),
        window=4,
        drop_path=0.0,
        d_model=32,
        text_width=32,
        text_heads=2,
        text_layers=1,
        encoder_layers=1,
        decoder_layers=2,
        geometry_layers=1,
        heads=4,
        ffn=64,
        queries=10,
    ),
}
# Model names -> sizes: "sam3" is Meta's model (FAMILY_DEFAULTS), "sam3-tiny" the test model.
MODELS: dict[str, str] = {"sam3": "full", "sam3-tiny": "tiny"}


def model_size(model: str) -> Sam3Size:
    """The :class:`Sam3Size` of a model name (ValueError naming the known ones)."""
    try:
        return SIZES[MODELS[model]]
    except KeyError:
        raise ValueError(f"unknown SAM 3 model {model!r}; known: {sorted(MODELS)}") from None


def bpe_vocabulary_path() -> str:
    """The BPE merges file, from the installed ``open_clip_torch`` (found without importing
    it: importing open_clip costs seconds and pulls timm's model registry)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / BPE_FILE
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != BPE_SHA256:
                raise FileNotFoundError(
                    f"{path} is not the BPE vocabulary SAM 3 was trained with "
                    f"(sha256 {digest}, expected {BPE_SHA256})"
                )
            return str(path)
    raise FileNotFoundError(
        f"SAM 3's tokenizer needs {BPE_FILE}, which the sam3 wheel does not ship; it is read "
        "from the open_clip_torch package (pip install open_clip_torch), which was not found"
    )


class _NoPinMemory(TorchFunctionMode):
    """``Tensor.pin_memory()`` returns the tensor itself: pinning only serves copies to a
    GPU, and without a CUDA runtime it raises."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **(kwargs or {}))


@functools.cache
def cpu_safe_geometry_encoder_class() -> type:
    """``SequenceGeometryEncoder`` whose ``_encode_boxes`` (``geometry_encoders.py:643-688``,
    the pin at :658-659, run even for the dummy prompt's 0 boxes) skips the pin for boxes
    not on CUDA. Torch function modes are thread-local: other threads are untouched."""
    base = sam3_api().SequenceGeometryEncoder

    class CpuSafeSequenceGeometryEncoder(base):
        def _encode_boxes(self, boxes, boxes_mask, boxes_labels, img_feats):
            if boxes.device.type == "cuda":
                return super()._encode_boxes(boxes, boxes_mask, boxes_labels, img_feats)
            with _NoPinMemory():
                return super()._encode_boxes(boxes, boxes_mask, boxes_labels, img_feats)

    return CpuSafeSequenceGeometryEncoder


def _position_encoding(api, d_model: int):
    # model_builder.py:58-66, without the CUDA pre-fill (precompute_resolution=None).
    return api.PositionEmbeddingSine(
        num_pos_feats=d_model,
        normalize=True,
        scale=None,
        temperature=10000,
        precompute_resolution=None,
    )


def _attention(api, size: Sam3Size, dropout: float, batch_first: bool | None = None):
    kwargs = {} if batch_first is None else {"batch_first": batch_first}
    return api.MultiheadAttention(
        num_heads=size.heads, dropout=dropout, embed_dim=size.d_model, **kwargs
    )


def _vision_backbone(api, size: Sam3Size):
    # model_builder.py:498-512 (_create_vision_backbone): position encoding, ViT (:69-96),
    # neck (:99-107) without the SAM 2 interactive neck (enable_inst_interactivity=False).
    position = _position_encoding(api, size.d_model)
    vit = api.ViT(
        img_size=size.resolution,
        pretrain_img_size=size.pretrain_resolution,
        patch_size=size.patch,
        embed_dim=size.vit_width,
        depth=size.vit_depth,
        num_heads=size.vit_heads,
        mlp_ratio=size.vit_mlp_ratio,
        norm_layer="LayerNorm",
        drop_path_rate=size.drop_path,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=size.global_blocks,
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=size.window,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
        compile_mode=None,
    )
    return api.Sam3DualViTDetNeck(
        position_encoding=position,
        d_model=size.d_model,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        trunk=vit,
        add_sam2_neck=False,
    )


def _text_encoder(api, size: Sam3Size, bpe_path: str):
    # model_builder.py:486-495 (_create_text_encoder).
    return api.VETextEncoder(
        tokenizer=api.SimpleTokenizer(bpe_path=bpe_path),
        d_model=size.d_model,
        width=size.text_width,
        heads=size.text_heads,
        layers=size.text_layers,
    )


def _transformer(api, size: Sam3Size):
    # model_builder.py:115-150 (encoder), :153-187 (decoder, resolution/stride None), :516-520.
    encoder_layer = api.TransformerEncoderLayer(
        activation="relu",
        d_model=size.d_model,
        dim_feedforward=size.ffn,
        dropout=size.dropout,
        pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False,
        pos_enc_at_cross_attn_queries=False,
        pre_norm=True,
        self_attention=_attention(api, size, size.dropout, batch_first=True),
        cross_attention=_attention(api, size, size.dropout, batch_first=True),
    )
    encoder = api.TransformerEncoderFusion(
        layer=encoder_layer,
        num_layers=size.encoder_layers,
        d_model=size.d_model,
        num_feature_levels=1,
        frozen=False,
        use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False,
        pool_text_with_mask=True,
    )
    decoder_layer = api.TransformerDecoderLayer(
        activation="relu",
        d_model=size.d_model,
        dim_feedforward=size.ffn,
        dropout=size.dropout,
        cross_attention=_attention(api, size, size.dropout),
        n_heads=size.heads,
        use_text_cross_attention=True,
    )
    decoder = api.TransformerDecoder(
        layer=decoder_layer,
        num_layers=size.decoder_layers,
        num_queries=size.queries,
        return_intermediate=True,
        box_refine=True,
        num_o2m_queries=0,
        dac=True,
        boxRPB="log",
        d_model=size.d_model,
        frozen=False,
        interaction_layer=None,
        dac_use_selfatt_ln=True,
        resolution=None,
        stride=None,
        use_act_checkpoint=True,
        presence_token=True,
    )
    return api.TransformerWrapper(encoder=encoder, decoder=decoder, d_model=size.d_model)


def _dot_product_scoring(api, size: Sam3Size):
    # model_builder.py:190-201.
    prompt_mlp = api.MLP(
        input_dim=size.d_model,
        hidden_dim=size.ffn,
        output_dim=size.d_model,
        num_layers=2,
        dropout=size.dropout,
        residual=True,
        out_norm=nn.LayerNorm(size.d_model),
    )
    return api.DotProductScoring(d_model=size.d_model, d_proj=size.d_model, prompt_mlp=prompt_mlp)


def _segmentation_head(api, size: Sam3Size):
    # model_builder.py:204-229.
    pixel_decoder = api.PixelDecoder(
        num_upsampling_stages=3,
        interpolation_mode="nearest",
        hidden_dim=size.d_model,
        compile_mode=None,
    )
    return api.UniversalSegmentationHead(
        hidden_dim=size.d_model,
        upsampling_stages=3,
        aux_masks=False,
        presence_head=False,
        dot_product_scorer=None,
        act_ckpt=True,
        cross_attend_prompt=_attention(api, size, 0),
        pixel_decoder=pixel_decoder,
    )


def _geometry_encoder(api, size: Sam3Size):
    # model_builder.py:232-285 (the CXBlock it also builds is never passed on, so not here).
    layer = api.TransformerEncoderLayer(
        activation="relu",
        d_model=size.d_model,
        dim_feedforward=size.ffn,
        dropout=size.dropout,
        pos_enc_at_attn=False,
        pre_norm=True,
        self_attention=_attention(api, size, size.dropout, batch_first=False),
        pos_enc_at_cross_attn_queries=False,
        pos_enc_at_cross_attn_keys=True,
        cross_attention=_attention(api, size, size.dropout, batch_first=False),
    )
    return cpu_safe_geometry_encoder_class()(
        pos_enc=_position_encoding(api, size.d_model),
        encode_boxes_as_points=False,
        points_direct_project=True,
        points_pool=True,
        points_pos_enc=True,
        boxes_direct_project=True,
        boxes_pool=True,
        boxes_pos_enc=True,
        d_model=size.d_model,
        num_layers=size.geometry_layers,
        layer=layer,
        use_act_ckpt=True,
        add_cls=True,
        add_post_encode_proj=True,
    )


def initialise_empty_text_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Draw the text encoder's ``torch.empty`` parameters (``text_encoder_ve.py:196, 218``)
    as open_clip's ``TextTransformer.init_parameters`` does (``transformer.py``: positional
    embedding std 0.01, projection std width**-0.5): left alone they hold whatever memory
    held, NaN included."""
    text = model.backbone.language_backbone.encoder
    with torch.no_grad():
        text.positional_embedding.normal_(0.0, 0.01, generator=generator)
        if isinstance(text.text_projection, nn.Parameter):
            text.text_projection.normal_(0.0, text.width**-0.5, generator=generator)


def build_image_model(size: Sam3Size, seed: int = 0, bpe_path: str | None = None) -> nn.Module:
    """A ``Sam3Image`` in eval mode on the CPU, weights drawn from ``seed``.

    Composed as ``build_sam3_image_model`` composes it (``model_builder.py:590-637``:
    vision backbone, text encoder, ``SAM3VLBackbone(scalp=1)``, transformer, dot-product
    scoring, segmentation head, geometry encoder, ``Sam3Image`` with its eval arguments,
    ``:288-327``). Draws happen in a forked RNG: the caller's random state is untouched.
    """
    api = sam3_api()
    bpe_path = bpe_path or bpe_vocabulary_path()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = _vision_backbone(api, size)
        text = _text_encoder(api, size, bpe_path)
        backbone = api.SAM3VLBackbone(visual=vision, text=text, scalp=1)
        transformer = _transformer(api, size)
        scoring = _dot_product_scoring(api, size)
        segmentation = _segmentation_head(api, size)
        geometry = _geometry_encoder(api, size)
        model = api.Sam3Image(
            backbone=backbone,
            transformer=transformer,
            input_geometry_encoder=geometry,
            segmentation_head=segmentation,
            num_feature_levels=1,
            o2m_mask_predict=True,
            dot_prod_scoring=scoring,
            use_instance_query=False,
            multimask_output=True,
            inst_interactive_predictor=None,
            matcher=None,
        )
        generator = torch.Generator().manual_seed(seed)
        initialise_empty_text_parameters(model, generator)
    return model.eval()  # weights as built: see Sam3Segmentor.__init__
