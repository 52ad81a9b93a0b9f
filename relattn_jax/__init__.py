"""relattn_jax: relative-position multi-head attention in JAX and Flax NNX.

The twin of ``relattn_torch``: same names, same equations, same weight layout.
"""

from .attention import masked_softmax, relative_attention
from .masks import causal_mask, combine_masks, padding_mask
from .modules import RelationAwareAttention, RelativeMultiHeadAttention
from .positions import relative_position_ids

__all__ = [
    "RelationAwareAttention",
    "RelativeMultiHeadAttention",
    "causal_mask",
    "combine_masks",
    "masked_softmax",
    "padding_mask",
    "relative_attention",
    "relative_position_ids",
]
__version__ = "0.1.0"
