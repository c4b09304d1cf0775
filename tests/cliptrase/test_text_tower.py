"""The text tower run only over the tokens up to the longest prompt's end-of-text token.

Under a causal mask with end-of-text pooling, cutting the context is exact: every check here
compares with open_clip's ``encode_text`` over the full 77-token context (random weights).
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from cliptrase import text as text_module
from cliptrase.text import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    encode_text_truncated,
    truncation_is_exact,
)

TOL = 1e-5
NAMES = ["cat", "traffic light", "a very small red fire hydrant next to the road"]
VARIED = [
    "",
    "cat",
    "a photo of a cat.",
    "a photo of the hard to see traffic light in the middle of the busy road.",
    "a bright photo of a " + "very " * 20 + "large dog.",
    "one " * 100,  # fills the whole context: EOT at position 76
]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _old_class_embeddings(clip, tokenizer, names, templates=DEFAULT_TEMPLATES, chunk=1024):
    """The previous formula: every chunk of prompts through encode_text on the full context."""
    prompts = [template(name) for name in names for template in templates]
    parts = []
    for start in range(0, len(prompts), chunk):
        tokens = tokenizer(prompts[start : start + chunk])
        parts.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(parts).reshape(len(names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


class _EncodeTextSpy:
    """Records the token widths ``clip.encode_text`` is called with."""

    def __init__(self, clip):
        self.widths: list[int] = []
        self._encode = clip.encode_text
        clip.encode_text = self

    def __call__(self, tokens, normalize: bool = False):
        self.widths.append(tokens.shape[1])
        return self._encode(tokens, normalize=normalize)


def _tiny_cfg(**text_cfg):
    return dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=1, width=32, head_width=32, patch_size=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2, **text_cfg),
    )


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


# ------------------------------------------------------------------ truncated == encode_text


def test_truncated_equals_full_encode_text_on_tiny_model_for_varied_prompts(tiny, tokenizer):
    assert truncation_is_exact(tiny.clip)
    tokens = tokenizer(VARIED)
    assert tokens.argmax(dim=-1).max().item() == 76  # one prompt fills the context
    with torch.inference_mode():
        full = _unit(tiny.clip.encode_text(tokens))
        cut = _unit(encode_text_truncated(tiny.clip, tokens))
        short = _unit(encode_text_truncated(tiny.clip, tokens[:3]))  # cut to 6 tokens
    assert _max_diff(cut, full) < TOL
    assert _max_diff(short, full[:3]) < TOL


def test_truncated_runs_the_tower_over_the_longest_prompt_only(tiny, tokenizer, monkeypatch):
    widths = []
    transformer = tiny.clip.transformer
    forward = transformer.forward

    def spy(x, attn_mask=None):
        widths.append((x.shape[1], tuple(attn_mask.shape)))
        return forward(x, attn_mask=attn_mask)

    monkeypatch.setattr(transformer, "forward", spy)
    tokens = tokenizer(["cat", "a photo of a cat."])
    with torch.inference_mode():
        encode_text_truncated(tiny.clip, tokens)
    length = tokens.argmax(dim=-1).max().item() + 1
    assert widths == [(length, (length, length))]


def test_truncated_equals_full_encode_text_on_80_templates_tiny(tiny, tokenizer):
    tokens = tokenizer([t(name) for name in NAMES for t in DEFAULT_TEMPLATES])
    assert len(DEFAULT_TEMPLATES) == 80
    with torch.inference_mode():
        full = _unit(tiny.clip.encode_text(tokens))
        cut = _unit(encode_text_truncated(tiny.clip, tokens))
    assert _max_diff(cut, full) < TOL


@pytest.mark.slow
def test_truncated_equals_full_encode_text_on_vit_b16_for_varied_prompts(vit_b16, tokenizer):
    assert truncation_is_exact(vit_b16.clip)
    tokens = tokenizer(VARIED)
    with torch.inference_mode():
        full = _unit(vit_b16.clip.encode_text(tokens))
        cut = _unit(encode_text_truncated(vit_b16.clip, tokens))
    assert _max_diff(cut, full) < TOL


@pytest.mark.slow
def test_truncated_equals_full_encode_text_on_80_templates_vit_b16(vit_b16, tokenizer):
    tokens = tokenizer([t(name) for name in NAMES[:2] for t in DEFAULT_TEMPLATES])
    with torch.inference_mode():
        full = _unit(vit_b16.clip.encode_text(tokens))
        cut = _unit(encode_text_truncated(vit_b16.clip, tokens))
    assert _max_diff(cut, full) < TOL


def test_truncated_equals_full_encode_text_for_custom_text_clip_over_text_transformer(tokenizer):
    clip = _seeded(lambda: open_clip.create_model("ViT-Tiny-16-test", force_custom_text=True))
    assert isinstance(clip, open_clip.CustomTextCLIP)
    assert truncation_is_exact(clip)
    tokens = tokenizer(VARIED)
    with torch.inference_mode():
        cut, full = encode_text_truncated(clip, tokens), clip.encode_text(tokens)
    assert _max_diff(_unit(cut), _unit(full)) < TOL


# ------------------------------------------------------------------ class_embeddings


@pytest.mark.parametrize("chunk", [1024, 37, 1])
def test_class_embeddings_equal_old_per_chunk_full_context_tiny(tiny, tokenizer, chunk):
    names = NAMES if chunk > 1 else NAMES[:1]
    old = _old_class_embeddings(tiny.clip, tokenizer, names, chunk=chunk)
    new = class_embeddings(tiny.clip, tokenizer, names, chunk=chunk)
    assert new.shape == old.shape == (len(names), tiny.clip.text_projection.shape[1])
    assert _max_diff(new, old) < TOL


@pytest.mark.slow
def test_class_embeddings_equal_old_per_chunk_full_context_vit_b16(vit_b16, tokenizer):
    names = NAMES[:2]
    old = _old_class_embeddings(vit_b16.clip, tokenizer, names, chunk=100)
    new = class_embeddings(vit_b16.clip, tokenizer, names, chunk=100)
    assert _max_diff(new, old) < TOL


def test_class_embeddings_keep_chunk_as_the_most_prompts_a_forward(tiny, tokenizer, monkeypatch):
    batches = []
    encode = text_module._encode_truncated

    def spy(tower, tokens):
        batches.append(tokens.shape[0])
        return encode(tower, tokens)

    monkeypatch.setattr(text_module, "_encode_truncated", spy)
    class_embeddings(tiny.clip, tokenizer, NAMES, chunk=50)
    assert sum(batches) == len(NAMES) * len(DEFAULT_TEMPLATES)
    assert max(batches) <= 50


def test_length_batches_cover_every_prompt_in_order_within_chunk():
    lengths = sorted([14] * 2 + [12] * 40 + [10] * 300 + [9] * 5 + [6] * 700, reverse=True)
    for chunk in (1, 7, 64, 1024):
        batches = text_module._length_batches(lengths, chunk)
        assert batches[0][0] == 0 and batches[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(batches, batches[1:]))
        assert all(0 < stop - start <= chunk for start, stop in batches)
    # a long run of much shorter prompts gets its own forward rather than padding
    assert text_module._length_batches(lengths, 1024) == [(0, 42), (42, 347), (347, 1047)]
    assert text_module._length_batches([], 8) == []


# ------------------------------------------------------------------ order after sorting


def test_order_is_preserved_when_prompts_are_sorted_by_length(tiny, tokenizer, monkeypatch):
    names = ["a " + "very " * 30 + "long name", "cat", "a medium sized name", "dog"]
    templates = [lambda c: f"{c}.", lambda c: f"a photo of the hard to see {c} in the scene."]
    seen = []
    encode = text_module._encode_truncated

    def spy(tower, tokens):
        seen.append(tokens.argmax(dim=-1) + 1)
        return encode(tower, tokens)

    monkeypatch.setattr(text_module, "_encode_truncated", spy)
    new = class_embeddings(tiny.clip, tokenizer, names, templates, chunk=3)
    lengths = torch.cat(seen)
    prompt_lengths = tokenizer([t(n) for n in names for t in templates]).argmax(dim=-1) + 1
    assert not torch.equal(lengths, prompt_lengths)  # the prompts were reordered ...
    assert torch.equal(lengths, prompt_lengths.sort(descending=True).values)  # ... by length
    for index, name in enumerate(names):  # ... and every row is back under its own name
        alone = _old_class_embeddings(tiny.clip, tokenizer, [name], templates)
        assert _max_diff(new[index : index + 1], alone) < TOL


# ------------------------------------------------------------------ fallback


@pytest.mark.parametrize("pool_type", ["first", "last", "none"])
def test_fallback_to_full_encode_text_when_pooling_is_not_argmax(tiny, tokenizer, pool_type):
    clip = copy.deepcopy(tiny.clip)
    clip.text_pool_type = pool_type
    assert not truncation_is_exact(clip)
    spy = _EncodeTextSpy(clip)
    tokens = tokenizer(VARIED[:3])
    with torch.inference_mode():
        out = encode_text_truncated(clip, tokens)
        full = spy._encode(tokens)
    assert spy.widths == [77]
    assert torch.equal(out, full)
    spy.widths.clear()
    if pool_type != "none":
        names = ["cat", "dog"]
        new = class_embeddings(clip, tokenizer, names, chunk=100)
        assert spy.widths == [77, 77]  # 160 prompts, chunks of 100, full context each
        assert _max_diff(new, _old_class_embeddings(clip, tokenizer, names, chunk=100)) < TOL


def test_fallback_for_a_custom_config_with_first_token_pooling(tokenizer):
    clip = _seeded(lambda: open_clip.CustomTextCLIP(**_tiny_cfg(pool_type="first")))
    assert not truncation_is_exact(clip)
    spy = _EncodeTextSpy(clip)
    new = class_embeddings(clip, tokenizer, ["cat", "dog"], chunk=100)
    assert spy.widths == [77, 77]
    assert _max_diff(new, _old_class_embeddings(clip, tokenizer, ["cat", "dog"], chunk=100)) < TOL


def test_fallback_without_a_causal_mask(tokenizer):
    clip = _seeded(lambda: open_clip.CLIP(**_tiny_cfg(no_causal_mask=True)))
    assert clip.attn_mask is None
    assert not truncation_is_exact(clip)
    spy = _EncodeTextSpy(clip)
    tokens = tokenizer(VARIED)
    with torch.inference_mode():
        assert torch.equal(encode_text_truncated(clip, tokens), spy._encode(tokens))
    assert spy.widths == [77]


def test_fallback_for_a_text_tower_it_does_not_recognise(tiny, tokenizer):
    class Wrapped(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def encode_text(self, tokens, normalize: bool = False):
            return self.clip.encode_text(tokens, normalize=normalize)

    wrapped = Wrapped(tiny.clip)
    assert not truncation_is_exact(wrapped)
    custom = _seeded(lambda: open_clip.create_model("ViT-Tiny-16-test", force_custom_text=True))
    custom.text.cls_emb = torch.nn.Parameter(torch.zeros(custom.text.width))  # CoCa-style
    assert not truncation_is_exact(custom)
    swapped = copy.deepcopy(tiny.clip)
    swapped.attn_mask = torch.zeros(77, 77)  # a bidirectional mask is not causal
    assert not truncation_is_exact(swapped)
    tokens = tokenizer(VARIED[:3])
    with torch.inference_mode():
        assert torch.equal(encode_text_truncated(wrapped, tokens), tiny.clip.encode_text(tokens))
        assert torch.equal(encode_text_truncated(swapped, tokens), swapped.encode_text(tokens))
