"""relattn_torch: relative-position multi-head attention in PyTorch.

The twin of ``relattn_jax``: same names, same equations, same weight layout.
"""

from importlib import metadata as _metadata

from .attention import masked_softmax, relative_attention
from .buckets import BertBuckets, DebertaBuckets, ShawBuckets, T5Buckets
from .cache import KVCache
from .choice import Choice, choose_implementation
from .decoder import DecoderConfig, DecoderLM
from .generate import generate
from .masks import causal_mask, combine_masks, padding_mask
from .modules import RelationAwareAttention, RelativeMultiHeadAttention
from .positions import relative_position_ids
from .importers import from_hf_bert_attention, from_hf_deberta_attention, from_hf_t5_attention
from .interop import from_torch_mha
from .weights import LoadResult, load_weights, save_weights

__all__ = [
    "BertBuckets",
    "Choice",
    "DebertaBuckets",
    "DecoderConfig",
    "DecoderLM",
    "LoadResult",
    "from_hf_bert_attention",
    "from_hf_deberta_attention",
    "from_hf_t5_attention",
    "from_torch_mha",
    "load_weights",
    "save_weights",
    "KVCache",
    "RelationAwareAttention",
    "RelativeMultiHeadAttention",
    "ShawBuckets",
    "T5Buckets",
    "causal_mask",
    "choose_implementation",
    "combine_masks",
    "generate",
    "masked_softmax",
    "padding_mask",
    "relative_attention",
    "relative_position_ids",
]

try:  # the one version source is pyproject.toml; an installed (or editable) relattn carries it
    __version__ = _metadata.version("relattn")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
