"""A deliberately naive, literal implementation of spec sections 1-8, for parity tests.

Written for clarity, not speed: per-head loops, explicit (N, N) attention matrices,
``torch.cosine_similarity``, per-cluster loops with ``torch.unique``, as the authors' single-GPU
evaluation computes them. It shares no code with ``cliptrase`` beyond open_clip's modules.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import median_filter
from sklearn.cluster import DBSCAN


@torch.no_grad()
def reference_text_embeddings(clip, tokenizer, names, templates):
    rows = []
    for name in names:
        feats = clip.encode_text(tokenizer([t(name) for t in templates]))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        mean = feats.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def _heads(x, num_heads):
    n, width = x.shape
    d = width // num_heads
    return [x[:, i * d : (i + 1) * d] for i in range(num_heads)]


@torch.no_grad()
def reference_forward(visual, pixels):
    """One image ``(1, 3, H, W)`` -> (tokens ``(N, D)`` unit-norm, S ``(N, N)``)."""
    x = visual.conv1(pixels)
    _, width, h, w = x.shape
    x = x.reshape(1, width, h * w).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(1, 1, width), x], dim=1)
    pos = visual.positional_embedding
    g = int(math.sqrt(pos.shape[0] - 1))
    if (h, w) != (g, g):
        patch_pos = pos[1:].reshape(1, g, g, width).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic"
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(-1, width)
        pos = torch.cat([pos[:1], patch_pos], dim=0)
    x = visual.ln_pre(x + pos)
    blocks = list(visual.transformer.resblocks)
    for block in blocks[:-2]:
        x = block(x)

    # Penultimate block: normal output; correlation S from its q, k, v.
    block = blocks[-2]
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x)[0], attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    per_head = []
    for qh, kh, vh in zip(
        _heads(q, attn.num_heads), _heads(k, attn.num_heads), _heads(v, attn.num_heads)
    ):
        cq = torch.cosine_similarity(qh[:, None], qh[None], dim=-1)
        ck = torch.cosine_similarity(kh[:, None], kh[None], dim=-1)
        cv = torch.cosine_similarity(vh[:, None], vh[None], dim=-1)
        per_head.append((cq + ck + cv) / 3.0)
    s = torch.stack(per_head).mean(dim=0)
    x = block(x)

    # Last block: sum of the three self-attentions, per head.
    block = blocks[-1]
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x)[0], attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    d = q.shape[-1] // attn.num_heads
    scale = d**-0.5
    outs = []
    for qh, kh, vh in zip(
        _heads(q, attn.num_heads), _heads(k, attn.num_heads), _heads(v, attn.num_heads)
    ):
        a = (
            torch.softmax(scale * qh @ qh.T, dim=-1)
            + torch.softmax(scale * kh @ kh.T, dim=-1)
            + torch.softmax(scale * vh @ vh.T, dim=-1)
        )
        outs.append(a @ vh)
    attn_out = attn.out_proj(torch.cat(outs, dim=-1))[None]
    x = x + block.ls_1(attn_out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    tokens = visual.ln_post(x)[0] @ visual.proj
    return tokens / tokens.norm(dim=-1, keepdim=True), s


@torch.no_grad()
def reference_segment(clip, text, pixels, num_classes, eps, min_samples, with_background):
    """Sections 6-8 for one image: returns (patch logits (K, h, w), R (hw, hw), labels (H, W))."""
    visual = clip.visual
    size = pixels.shape[-2:]
    p = visual.patch_size[0]
    h, w = size[0] // p, size[1] // p
    tokens, s = reference_forward(visual, pixels)
    r = s[1:, 1:] - s[0:1, 1:]
    r[r < 0] = 0
    logits = (tokens[1:] @ text.T * clip.logit_scale.exp()).T.reshape(-1, h, w)
    up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    pred = up.argmax(dim=0)
    if with_background:
        pred[pred >= num_classes] = num_classes
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(r.numpy())
    labels = torch.from_numpy(labels)
    found = torch.unique(labels)
    if len(found) == 1 and found[0] == -1:
        return logits, r, pred
    found = found[found >= 0]
    maps = torch.stack([r[labels == c].mean(dim=0) for c in found]).reshape(len(found), h, w)
    maps = F.interpolate(maps[None], size=(4 * h, 4 * w), mode="bilinear", align_corners=False)[
        0
    ].numpy()
    for i in range(maps.shape[0]):
        maps[i] = median_filter(maps[i], size=7)
    maps = F.interpolate(
        torch.from_numpy(maps)[None], size=size, mode="bilinear", align_corners=False
    )[0]
    regions = maps.argmax(dim=0)
    for c in range(len(found)):
        values, counts = torch.unique(pred[regions == c], return_counts=True)
        if len(counts):
            pred[regions == c] = values[counts.argmax()]
    return logits, r, pred


def as_numpy(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
