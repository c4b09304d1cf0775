"""The text classifier: class names, synonyms and background words to unit embeddings.

Spec section 5, plus synonyms (peers.md section 2): a class may be prompted by several phrases,
each its own embedding row; the decision head takes the max over a class's rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import (
    CustomResidualAttentionBlock,
    ResidualAttentionBlock,
    TextTransformer,
    Transformer,
    text_global_pool,
)

Template = Callable[[str], str]


def as_template(template: Template | str) -> Template:
    """A prompt template as a callable: ``"a photo of a {}."`` strings become ``str.format``."""
    if callable(template):
        return template
    if "{}" not in template:
        raise ValueError(f"a prompt template must contain '{{}}' for the class name: {template!r}")
    return template.format


DEFAULT_TEMPLATES: tuple[Template, ...] = tuple(open_clip.OPENAI_IMAGENET_TEMPLATES)
# MaskCLIP's 85: the 80 above and five scene templates (MaskCLIP, prompt_engineering.py).
MASKCLIP_EXTRA_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


# Templates are serialised by what they make of these names ("{}" shows a format string as is;
# the second catches a callable that does more than substitute).
_PROBES = ("{}", "Probe Name")


def serialise_template(template: Template | str) -> list[str]:
    """What a template makes of fixed probe names: how caches and hashes see a template."""
    fn = template if callable(template) else template.format
    return [str(fn(probe)) for probe in _PROBES]


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """A compiled vocabulary: label ``i`` is ``names[i]``; rows of ``embeddings`` score classes.

    With background words, ``embeddings`` has ``C + B`` rows (one per foreground class, then
    one per background word) while ``names`` has ``C + 1`` entries: every background word
    predicts the single label ``C`` named ``"background"``. Synonyms add rows after those, in
    class order (``synonyms[i]``: the extra phrases of class ``i``); ``row_labels`` says which
    label every row predicts.
    """

    classes: tuple[str, ...]
    background: tuple[str, ...]
    embeddings: torch.Tensor = field(repr=False)
    synonyms: tuple[tuple[str, ...], ...] = ()
    # FLOSS (cliptrase.floss): ``(E, rows, D)`` expert classifiers, expert ``e`` the one of
    # class ``expert_labels[e]``; None: the plain classifier ``embeddings`` alone.
    expert_embeddings: torch.Tensor | None = field(default=None, repr=False)
    expert_labels: tuple[int, ...] = ()

    @property
    def row_labels(self) -> torch.Tensor:
        """``(rows,)`` int64: the label each row of ``embeddings`` predicts."""
        labels = list(range(self.num_classes)) + [self.num_classes] * len(self.background)
        for index, extra in enumerate(self.synonyms):
            labels += [index] * len(extra)
        return torch.tensor(labels, dtype=torch.int64)

    @property
    def prompts(self) -> list[str]:
        """The phrase of every row of ``embeddings``."""
        return list(self.classes) + list(self.background) + [s for x in self.synonyms for s in x]

    @property
    def num_classes(self) -> int:
        """Foreground classes ``C``."""
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return list(self.classes) + (["background"] if self.background else [])

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def background_label(self) -> int | None:
        return self.num_classes if self.background else None


# --------------------------------------------------------------------------- truncated text tower
# open_clip pads every prompt to the full context (77 tokens) though most prompts are ~10 tokens.
# Under a causal mask no token attends to a later one, so for a tower that pools at the
# end-of-text token nothing after that token can change the pooled row: running the tower over
# the first ``max(eot) + 1`` tokens (with the positional embedding and the mask sliced alike) is
# the same computation. Only open_clip's standard tower is recognised; anything else runs
# ``clip.encode_text`` on the full context.

# Pool types that read the row at the end-of-text token: "argmax" (the EOT id is the largest
# token id, CLIP's tokenizer) and "eos" (a tokenizer-specific EOT id).
_EOT_POOL_TYPES = ("argmax", "eos")
# One forward costs about this many token rows on top of its tokens (layer launches, python):
# a batch of shorter prompts is split off when it saves more padded rows than that.
_CALL_OVERHEAD_ROWS = 256


@dataclass(frozen=True)
class _CausalTextTower:
    """The pieces ``encode_text`` runs, found on a model where truncation is exact."""

    token_embedding: torch.nn.Embedding
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    attn_mask: torch.Tensor
    ln_final: torch.nn.Module
    text_projection: torch.nn.Module | torch.Tensor | None
    pool_type: str
    eos_id: int | None

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B,)`` the position each row pools at, as ``text_global_pool`` finds it."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_id).int().argmax(dim=-1)


def _is_causal_mask(mask: object, size: int) -> bool:
    if not isinstance(mask, torch.Tensor) or mask.shape != (size, size):
        return False
    if not mask.is_floating_point():
        return False
    causal = torch.full((size, size), float("-inf"), dtype=mask.dtype, device=mask.device)
    return torch.equal(mask, causal.triu_(1))


def _causal_text_tower(clip: torch.nn.Module) -> _CausalTextTower | None:
    """The text tower of ``clip`` if cutting its context to the longest prompt is exact, else None.

    Exact for open_clip's ``CLIP.encode_text`` and for ``CustomTextCLIP`` over a plain
    ``TextTransformer`` (no class token, no padding mask, pooled features only), when the
    attention mask is causal, the pooling reads the end-of-text row and the blocks are
    open_clip's own (per-token layers around causal self-attention).
    """
    encode_text = getattr(type(clip), "encode_text", None)
    if encode_text is CLIP.encode_text:
        parts = clip
        pool_type = getattr(clip, "text_pool_type", None)
        eos_id = getattr(clip, "text_eos_id", None)
    elif encode_text is CustomTextCLIP.encode_text:
        parts = getattr(clip, "text", None)
        if type(parts) is not TextTransformer:  # e.g. a Hugging Face text model
            return None
        if parts.cls_emb is not None or parts.use_pad_mask or parts.output_tokens:
            return None
        pool_type, eos_id = parts.pool_type, parts.eos_id
    else:
        return None
    if pool_type not in _EOT_POOL_TYPES or (pool_type == "eos" and eos_id is None):
        return None
    transformer = getattr(parts, "transformer", None)
    if type(transformer) is not Transformer:
        return None
    blocks = (ResidualAttentionBlock, CustomResidualAttentionBlock)
    if any(type(block) not in blocks or block.attn is None for block in transformer.resblocks):
        return None
    token_embedding = getattr(parts, "token_embedding", None)
    positional = getattr(parts, "positional_embedding", None)
    ln_final = getattr(parts, "ln_final", None)
    projection = getattr(parts, "text_projection", None)
    if not isinstance(token_embedding, torch.nn.Embedding):
        return None
    if not isinstance(positional, torch.Tensor) or positional.ndim != 2:
        return None
    if not isinstance(ln_final, torch.nn.LayerNorm | torch.nn.Identity):
        return None
    if projection is not None and not isinstance(projection, torch.nn.Linear | torch.Tensor):
        return None
    mask = getattr(parts, "attn_mask", None)
    if not _is_causal_mask(mask, positional.shape[0]):
        return None
    return _CausalTextTower(
        token_embedding, positional, transformer, mask, ln_final, projection, pool_type, eos_id
    )


def truncation_is_exact(clip: torch.nn.Module) -> bool:
    """Whether :func:`encode_text_truncated` cuts the context for ``clip`` (else it falls back)."""
    return _causal_text_tower(clip) is not None


def _encode_truncated(tower: _CausalTextTower, tokens: torch.Tensor) -> torch.Tensor:
    """``encode_text`` over the first ``max(eot) + 1`` tokens: open_clip's steps, sliced."""
    length = int(tower.eot_positions(tokens).max()) + 1 if tokens.shape[0] else 1
    tokens = tokens[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = text_global_pool(x, tokens, tower.pool_type, eos_token_id=tower.eos_id)
    if tower.text_projection is not None:
        if isinstance(tower.text_projection, torch.nn.Linear):
            x = tower.text_projection(x)
        else:
            x = x @ tower.text_projection
    return x


def encode_text_truncated(clip: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``clip.encode_text(tokens)``, run only over the tokens up to the longest prompt's EOT.

    ``tokens`` is ``(B, context_length)`` as the tokenizer gives it. Exact (equal up to float
    rounding) where :func:`truncation_is_exact`; any other model, or tokens not padded to the
    model's context, runs ``clip.encode_text(tokens)`` unchanged.
    """
    tower = _causal_text_tower(clip)
    if tower is None or tokens.ndim != 2 or tokens.shape[1] != tower.positional_embedding.shape[0]:
        return clip.encode_text(tokens)
    return _encode_truncated(tower, tokens)


def _length_batches(lengths: Sequence[int], chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of ``lengths`` (sorted descending) to encode together.

    At most ``chunk`` prompts a batch; a run of shorter prompts starts its own batch when
    padding it to the batch's longest prompt would cost more rows than another forward.
    """
    batches, start = [], 0
    for index in range(1, len(lengths) + 1):
        if index == len(lengths) or index - start == chunk:
            batches.append((start, index))
            start = index
        elif lengths[index] != lengths[index - 1]:
            run_end = index
            while run_end < len(lengths) and lengths[run_end] == lengths[index]:
                run_end += 1
            run = min(run_end, start + chunk) - index
            if run * (lengths[start] - lengths[index]) > _CALL_OVERHEAD_ROWS:
                batches.append((start, index))
                start = index
    return batches


@torch.inference_mode()
def class_embeddings(
    clip: torch.nn.Module,
    tokenizer: Callable,
    names: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    device: torch.device | str = "cpu",
    chunk: int = 1024,
) -> torch.Tensor:
    """One unit row per name: normalise each template's embedding, average, normalise again.

    The text tower sees at most ``chunk`` prompts a forward. Where truncation is exact
    (:func:`truncation_is_exact`) prompts are sorted by token length and each forward runs over
    its longest prompt only, then rows return to prompt order; otherwise every chunk runs
    ``clip.encode_text`` on the full context.
    """
    prompts = [template(name) for name in names for template in templates]
    tokens = torch.cat([tokenizer(prompts[s : s + chunk]) for s in range(0, len(prompts), chunk)])
    tower = _causal_text_tower(clip)
    if tower is None or tokens.shape[1] != tower.positional_embedding.shape[0]:
        parts = [
            F.normalize(clip.encode_text(tokens[s : s + chunk].to(device)).float(), dim=-1)
            for s in range(0, len(prompts), chunk)
        ]
        per_prompt = torch.cat(parts)
    else:
        lengths = tower.eot_positions(tokens) + 1
        order = torch.argsort(lengths, descending=True, stable=True)
        sorted_tokens, sorted_lengths = tokens[order], lengths[order].tolist()
        parts = [
            F.normalize(_encode_truncated(tower, sorted_tokens[s:e].to(device)).float(), dim=-1)
            for s, e in _length_batches(sorted_lengths, chunk)
        ]
        sorted_rows = torch.cat(parts)
        per_prompt = torch.empty_like(sorted_rows)
        per_prompt[order.to(sorted_rows.device)] = sorted_rows
    per_prompt = per_prompt.reshape(len(names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)
