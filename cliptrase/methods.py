"""Training-free methods as compositions of separate pieces.

A method is: an attention strategy for the last block, whether that block keeps its residual
and its MLP, which block's self-correlation (if any) feeds the refiner, a decision head
option, and a refiner. New methods (SCLIP, ClearCLIP, NACLIP, ...) are new presets here and,
where needed, a new strategy in ``attention`` or refiner in ``refine``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .attention import ATTENTION_STRATEGIES
from .refine import ClusterVote


@dataclass(frozen=True)
class Method:
    name: str
    attention: str = "qq+kk+vv"
    keep_residual: bool = True
    keep_ffn: bool = True
    # Index (Python-style, -2 = penultimate) of the block whose self-correlation is read.
    correlation_block: int | None = -2
    refiner: ClusterVote | None = field(default_factory=ClusterVote)
    # Weight patch logits by the [CLS] logits (the authors' VOC-without-background option).
    cls_weighting: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_STRATEGIES:
            raise ValueError(
                f"unknown attention {self.attention!r}; known: {sorted(ATTENTION_STRATEGIES)}"
            )
        if self.refiner is not None and self.correlation_block is None:
            raise ValueError("the cluster-vote refiner needs a correlation_block")

    def with_options(self, **changes) -> Method:
        return replace(self, **changes)


METHODS: dict[str, Method] = {
    # arXiv 2407.08268: qq+kk+vv in the last block, layer L-1 correlation, DBSCAN vote.
    "cliptrase": Method("cliptrase"),
}


def method_preset(name: str | Method) -> Method:
    if isinstance(name, Method):
        return name
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None
