"""ActiveSAM's Contextual Prompt Expansion (arXiv 2606.16996, ``activesam/prompt_expansion``):
lexical canonicalisation of class names, semantic-neighbour tokens, WordNet hypernyms.

The canonicalisation maps are data, as ActiveSAM's ``lexical.py:10-65`` has them; the token
functions work on the text encoder's outputs (:mod:`cliptrase.sam3.vocabulary` calls them
once per vocabulary).
"""

from __future__ import annotations

import re

import torch
from torch import nn

# lexical.py:10-39: compound words SAM 3's tokenizer would see as one unknown word.
COMPOUND_SPLIT_MAP: dict[str, str] = {
    "trafficlight": "traffic light",
    "trafficsign": "traffic sign",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "windowpane": "window pane",
    "coffeetable": "coffee table",
    "streetlight": "street light",
    "signboard": "sign board",
    "arcademachine": "arcade machine",
    "kitchenisland": "kitchen island",
    "dirttrack": "dirt track",
    "chestofdrawers": "chest of drawers",
    "televisionreceiver": "television receiver",
    "conveyerbelt": "conveyor belt",
    "bedclothes": "bed clothes",
    "sportsball": "sports ball",
    "baseballbat": "baseball bat",
    "baseballglove": "baseball glove",
    "tennisracket": "tennis racket",
    "wineglass": "wine glass",
    "cellphone": "cell phone",
    "hairdrier": "hair drier",
    "firehydrant": "fire hydrant",
    "stopsign": "stop sign",
    "parkingmeter": "parking meter",
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "motorbike": "motorcycle",
}
# lexical.py:41-54: COCO-Stuff's "wall-brick" style names in natural word order.
WORDORDER_REPAIR_MAP: dict[str, str] = {
    "wallbrick": "brick wall",
    "wallconcrete": "concrete wall",
    "wallstone": "stone wall",
    "walltile": "tile wall",
    "wallwood": "wooden wall",
    "wallpanel": "wall panel",
    "floormarble": "marble floor",
    "floorstone": "stone floor",
    "floortile": "tile floor",
    "floorwood": "wooden floor",
    "ceilingtile": "tile ceiling",
    "windowblind": "window blind",
}
# lexical.py:57-65: homonyms and archaic names -> the specific noun phrase.
AMBIGUOUS_LABEL_MAP: dict[str, str] = {
    "tie": "necktie",
    "remote": "remote control",
    "mouse": "computer mouse",
    "monitor": "computer monitor",
    "ashcan": "trash can",
    "plaything": "toy",
    "buffet": "sideboard",
}


def lexical_key(name: str) -> str:
    """Lower case, non-alphanumerics dropped (``lexical.py:68-71``): "Traffic-Light" and
    "traffic light" both key "trafficlight"."""
    return re.sub(r"[^a-z0-9]+", "", name.lower())


def canonical_prompt(name: str) -> str:
    """The text ActiveSAM encodes for a class name (``_canonicalize(name, universal=True)``,
    ``lexical.py:74-83``, installed with ``universal=True`` by ``segmentor.py:56``): the
    compound split, else the word-order repair, else the disambiguation, else ``name``
    unchanged (casing and spacing kept)."""
    key = lexical_key(name)
    for table in (COMPOUND_SPLIT_MAP, WORDORDER_REPAIR_MAP, AMBIGUOUS_LABEL_MAP):
        if key in table:
            return table[key]
    return name


def pooled_token_embeddings(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, D]``: the mean of each prompt's raw token embeddings over its valid tokens.

    ``embeds [L, N, D]`` is ``language_embeds`` (the token embedding before the text
    transformer, seq-first), ``mask [N, L]`` ``language_mask`` (True = padding); ActiveSAM's
    ``pooled_text_embeddings`` (``memory_bank.py:64-78``)."""
    valid = (~mask).to(embeds.dtype).transpose(0, 1).unsqueeze(-1)
    summed = (embeds * valid).sum(dim=0)
    counts = valid.sum(dim=0).clamp_min(1.0)
    return summed / counts


def neighbour_token_inputs(
    pooled: torch.Tensor, count: int, temperature: float = 1.0
) -> torch.Tensor:
    """``[N, count, D]``: for each prompt, its ``count`` most cosine-similar *other* prompts'
    pooled embeddings, weighted by the softmax of those similarities / ``temperature``
    (``SemanticNeighborBank.precompute_global``, ``neighbor_tokens.py:36-51``;
    ``cosine_matrix``, ``memory_bank.py:81-84``).

    With fewer than ``count + 1`` prompts the official code cannot run (``topk`` over the
    other prompts); here the missing neighbours get weight 0.
    """
    normalised = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    similarity = normalised @ normalised.T
    similarity.fill_diagonal_(-float("inf"))
    if similarity.shape[1] < count:
        padding = similarity.new_full(
            (similarity.shape[0], count - similarity.shape[1]), -float("inf")
        )
        similarity = torch.cat([similarity, padding], dim=1)
    values, index = similarity.topk(count, dim=1)
    weights = torch.softmax(values / max(temperature, 1e-6), dim=1).nan_to_num(0.0)
    index = index.clamp_max(pooled.shape[0] - 1)
    return pooled[index] * weights.unsqueeze(-1)


def neighbour_tokens(pooled: torch.Tensor, resizer: nn.Module, count: int) -> torch.Tensor:
    """``[N, count, d_model]`` float32 semantic-neighbour memory tokens: the weighted
    neighbours projected by the text encoder's ``resizer`` (Linear 1024 -> 256 with bias,
    ``neighbor_tokens.py:50``, ``memory_bank.py:87-89``), in float32 outside autocast
    (``segmentor.py:90-94``)."""
    return resizer(neighbour_token_inputs(pooled.float(), count)).float()


def wordnet_hypernyms(name: str, count: int) -> list[str]:
    """Up to ``count`` immediate hypernyms of the first WordNet noun sense of ``name``
    (``hypernym_tokens.py:19-43``: spaces and hyphens as underscores, first lemma of each
    hypernym, underscores back to spaces, duplicates dropped).

    Unlike the official code, which silently returns nothing without nltk (and crashes
    without its corpus), a missing nltk or WordNet corpus is an error here: asking for
    hypernym tokens should not quietly give the run without them.
    """
    try:
        from nltk.corpus import wordnet

        synsets = wordnet.synsets(
            name.strip().lower().replace(" ", "_").replace("-", "_"), pos=wordnet.NOUN
        )
    except ImportError as exc:
        raise ImportError(
            "hypernym_tokens > 0 needs nltk (pip install nltk) and its WordNet corpus "
            "(python -m nltk.downloader wordnet); or use hypernym_tokens=0"
        ) from exc
    except LookupError as exc:
        raise LookupError(
            "hypernym_tokens > 0 needs nltk's WordNet corpus (python -m nltk.downloader "
            "wordnet, WordNet 3.0 as the official runs); or use hypernym_tokens=0"
        ) from exc
    if not synsets:
        return []
    out: list[str] = []
    for hypernym in synsets[0].hypernyms()[:count]:
        lemma = hypernym.lemmas()[0].name().replace("_", " ")
        if lemma and lemma not in out:
            out.append(lemma)
    return out
