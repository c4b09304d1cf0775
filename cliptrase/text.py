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

Template = Callable[[str], str]
DEFAULT_TEMPLATES: tuple[Template, ...] = tuple(open_clip.OPENAI_IMAGENET_TEMPLATES)
# MaskCLIP's 85: the 80 above and five scene templates (MaskCLIP, prompt_engineering.py).
MASKCLIP_EXTRA_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


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


@torch.inference_mode()
def class_embeddings(
    clip: torch.nn.Module,
    tokenizer: Callable,
    names: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    device: torch.device | str = "cpu",
    chunk: int = 1024,
) -> torch.Tensor:
    """One unit row per name: normalise each template's embedding, average, normalise again."""
    prompts = [template(name) for name in names for template in templates]
    parts = []
    for start in range(0, len(prompts), chunk):
        tokens = tokenizer(prompts[start : start + chunk]).to(device)
        parts.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(parts).reshape(len(names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)
