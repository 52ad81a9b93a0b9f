"""Import the attention layers of Hugging Face transformers' T5, BERT and DeBERTa-v2 (PyTorch only).

``relattn_jax`` has no twin of this file: these functions read PyTorch ``transformers`` modules
(transformers v5 has no Flax models left). What reaches JAX is the imported module's weight file
(``save_weights``), which loads into ``relattn_jax.RelativeMultiHeadAttention`` built with the same
arguments. transformers itself is never imported here: the layers are read by attribute.

Each importer returns a ``RelativeMultiHeadAttention`` ``m`` whose ``m(x, mask=mask)`` (bool
mask, True = may attend) equals the transformers layer up to and including its output
projection (T5's ``o``, BERT's and DeBERTa's ``output.dense``); dropout, the residual and the
LayerNorm stay outside. Linear weights [out, in] over flattened heads (feature n * H + h) become
per-head parameters, as in ``interop.py``: w_q[e, n, h] = W_q[n * H + h, e] and
w_o[n, h, e] = W_o[e, n * H + h]. The relation tables, with the scheme that indexes them:

    T5       rel_bias [R, N] = relative_attention_bias.weight; T5Buckets; scale 1, no biases
    BERT     rel_k = distance_embedding.weight [R, H] (rel_q = the same table for
             relative_key_query); BertBuckets(max_position_embeddings); scale 1 / sqrt(H)
    DeBERTa  rel_k = pos_key_proj(rel) (c2p), rel_q = pos_query_proj(rel) (p2c), [R, N, H] with
             rel = rel_embeddings[:R] (key_proj / query_proj when share_att_key);
             DebertaBuckets(position_buckets, max_relative_positions);
             scale 1 / sqrt(H * (1 + number of c2p / p2c terms)), the square root in float32
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .buckets import BertBuckets, DebertaBuckets, T5Buckets
from .modules import RelativeMultiHeadAttention

__all__ = ["from_hf_bert_attention", "from_hf_deberta_attention", "from_hf_t5_attention"]


@dataclass
class _Mapping:
    """What an importer reads off a transformers layer: the module's arguments and its parameters."""

    embed_dim: int
    num_heads: int
    head_dim: int
    scale: float
    dropout: float
    scheme: T5Buckets | BertBuckets | DebertaBuckets | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # canonical parameter name -> value


def from_hf_t5_attention(layer: nn.Module, relative_attention_bias: nn.Embedding | torch.Tensor | None = None
                         ) -> RelativeMultiHeadAttention:
    """A ``RelativeMultiHeadAttention`` computing what a transformers ``T5Attention`` computes.

    T5 adds a per-head scalar bias b[bucket(j - i), n] to the unscaled logits q_i . k_j; only the
    first layer of each stack holds the table (``relative_attention_bias``), the others reuse it.
    The new module has scale 1, no projection biases, ``rel_bias`` = that table and
    ``T5Buckets(num_buckets, max_distance, bidirectional=not is_decoder)``. A layer with no table
    and none given (a cross-attention layer) gives a module without relative terms. A decoder's
    causal mask stays the caller's: ``m(x, is_causal=True)`` or a mask.

    Args:
        layer: a ``transformers`` ``T5Attention`` (or a layer with its attributes, e.g. MT5's).
        relative_attention_bias: the first layer's table, for a later self-attention layer that
            has none: an ``nn.Embedding`` or its weight [num_buckets, num_heads]. Takes the place
            of the layer's own table when both exist.

    Returns:
        The new module, on the layer's device and dtype, in the layer's train/eval mode.
    """
    return _module(_t5(layer, relative_attention_bias), layer)


def _t5(layer, relative_attention_bias=None) -> _Mapping:
    _needs(layer, "T5Attention", "q", "k", "v", "o", "n_heads", "key_value_proj_dim", "d_model", "is_decoder",
           "relative_attention_num_buckets", "relative_attention_max_distance")
    N, H = layer.n_heads, layer.key_value_proj_dim
    table = relative_attention_bias
    if table is None and getattr(layer, "has_relative_attention_bias", False):
        table = layer.relative_attention_bias
    m = _Mapping(layer.d_model, N, H, scale=1.0, dropout=float(getattr(layer, "dropout", 0.0)))
    m.tensors.update(_projections(layer.q, layer.k, layer.v, layer.o, N, H, biases=False))
    if table is not None:
        table = (table.weight if isinstance(table, nn.Embedding) else table).detach()
        want = (layer.relative_attention_num_buckets, N)
        if tuple(table.shape) != want:
            raise ValueError(f"relative_attention_bias must be [num_buckets, num_heads] = {list(want)}, "
                             f"got {list(table.shape)}")
        m.scheme = T5Buckets(layer.relative_attention_num_buckets, layer.relative_attention_max_distance,
                             bidirectional=not layer.is_decoder)
        m.tensors["rel_bias"] = table
    return m


def from_hf_bert_attention(attention: nn.Module) -> RelativeMultiHeadAttention:
    """A ``RelativeMultiHeadAttention`` computing what a transformers ``BertAttention`` computes
    with ``position_embedding_type`` "relative_key" or "relative_key_query" (transformers 4.x).

    BERT adds q_i . a[r_ij] (and k_j . a[r_ij] for relative_key_query) to q_i . k_j before dividing by
    sqrt(H), with one table a = ``distance_embedding.weight`` [2 P - 1, H] shared by the heads and
    r_ij = i - j + P - 1, ``BertBuckets(max_position_embeddings)``. The new module has
    ``rel_k`` = a (and ``rel_q`` = a), the projections' biases, and ``output.dense`` as w_o / b_o.

    Args:
        attention: a ``transformers`` ``BertAttention`` (``.self`` and ``.output.dense``).

    Returns:
        The new module, on the layer's device and dtype, in the layer's train/eval mode.
    """
    return _module(_bert(attention), attention)


def _bert(attention) -> _Mapping:
    _needs(attention, "BertAttention", "self", "output")
    sa = attention.self
    _needs(sa, "BertAttention.self", "query", "key", "value", "num_attention_heads", "attention_head_size")
    kind = getattr(sa, "position_embedding_type", None)
    if kind not in ("relative_key", "relative_key_query"):
        raise ValueError(f"attention must use position_embedding_type 'relative_key' or 'relative_key_query', "
                         f"got {kind!r}")
    N, H = sa.num_attention_heads, sa.attention_head_size
    m = _Mapping(sa.query.in_features, N, H, scale=1 / math.sqrt(H), dropout=float(sa.dropout.p),
                 scheme=BertBuckets(sa.max_position_embeddings))
    m.tensors.update(_projections(sa.query, sa.key, sa.value, attention.output.dense, N, H, biases=True))
    table = sa.distance_embedding.weight.detach()  # [2 P - 1, H]
    m.tensors["rel_k"] = table
    if kind == "relative_key_query":
        m.tensors["rel_q"] = table.clone()
    return m


def from_hf_deberta_attention(attention: nn.Module, rel_embeddings: torch.Tensor | None) -> RelativeMultiHeadAttention:
    """A ``RelativeMultiHeadAttention`` computing what a transformers ``DebertaV2Attention`` computes.

    DeBERTa's logits are (q_i . k_j + q_i . P^K[r_ij] + k_j . P^Q[r_ij]) / sqrt(H * f), with the
    content-to-position table P^K = pos_key_proj(rel_embeddings) (c2p), the position-to-content
    table P^Q = pos_query_proj(rel_embeddings) (p2c), per head [R, N, H], and f = 1 + the number of
    those terms in ``pos_att_type``. The tables are projected once here, so training the new module
    trains them, not the embeddings.

    Args:
        attention: a ``transformers`` ``DebertaV2Attention`` (``.self``, a
            ``DisentangledSelfAttention``, and ``.output.dense``).
        rel_embeddings: the relative embeddings the encoder passes its layers, after the
            encoder's LayerNorm: ``encoder.get_rel_embedding()``, [>= R, E]. Ignored (may be None)
            when the config has ``relative_attention=False``.

    Returns:
        The new module, on the layer's device and dtype, in the layer's train/eval mode.
    """
    return _module(_deberta(attention, rel_embeddings), attention)


def _deberta(attention, rel_embeddings) -> _Mapping:
    _needs(attention, "DebertaV2Attention", "self", "output")
    sa = attention.self
    _needs(sa, "DebertaV2Attention.self", "query_proj", "key_proj", "value_proj", "num_attention_heads",
           "attention_head_size", "pos_att_type")
    N, H = sa.num_attention_heads, sa.attention_head_size
    terms = [t for t in ("c2p", "p2c") if t in sa.pos_att_type]
    scale = 1 / float(torch.sqrt(torch.tensor(H, dtype=torch.float32) * (1 + len(terms))))  # DeBERTa's float32 root
    m = _Mapping(sa.query_proj.in_features, N, H, scale=scale, dropout=float(sa.dropout.p))
    m.tensors.update(_projections(sa.query_proj, sa.key_proj, sa.value_proj, attention.output.dense, N, H, True))
    if getattr(sa, "relative_attention", False) and terms:
        m.scheme = DebertaBuckets(max(sa.position_buckets, 0), sa.max_relative_positions)
        rel = _deberta_rows(rel_embeddings, m.scheme.num_ids, m.embed_dim)
        projections = {"rel_k": "key_proj" if sa.share_att_key else "pos_key_proj",  # c2p
                       "rel_q": "query_proj" if sa.share_att_key else "pos_query_proj"}  # p2c
        for name, term in (("rel_k", "c2p"), ("rel_q", "p2c")):
            if term in terms:
                _needs(sa, "DebertaV2Attention.self", projections[name])
                with torch.no_grad():
                    m.tensors[name] = getattr(sa, projections[name])(rel).reshape(-1, N, H)  # [R, N, H]
    return m


def _deberta_rows(rel_embeddings, R: int, E: int) -> torch.Tensor:
    """The first R rows of the encoder's relative embeddings (DeBERTa reads no others)."""
    if not isinstance(rel_embeddings, torch.Tensor):
        raise TypeError(f"rel_embeddings must be a torch.Tensor [>= {R}, {E}] (encoder.get_rel_embedding()), "
                        f"got {type(rel_embeddings).__name__}")
    if rel_embeddings.dim() != 2 or rel_embeddings.shape[0] < R or rel_embeddings.shape[1] != E:
        raise ValueError(f"rel_embeddings must be [>= {R}, {E}] (2 * the attention span rows of width hidden_size), "
                         f"got {list(rel_embeddings.shape)}")
    return rel_embeddings.detach()[:R]


def _projections(q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, N: int, H: int, biases: bool):
    """Linear [N * H, E] / [E, N * H] weights as w_q, w_k, w_v [E, N, H] and w_o [N, H, E], with biases."""
    out = {name: lin.weight.detach().T.reshape(-1, N, H) for name, lin in (("w_q", q), ("w_k", k), ("w_v", v))}
    out["w_o"] = o.weight.detach().T.reshape(N, H, -1)
    if biases:
        for name, lin, shape in (("b_q", q, (N, H)), ("b_k", k, (N, H)), ("b_v", v, (N, H)), ("b_o", o, (-1,))):
            if lin.bias is None:
                raise ValueError(f"the layer's {name[-1]} projection has no bias; the importer expects one")
            out[name] = lin.bias.detach().reshape(shape)
    return out


def _module(m: _Mapping, source: nn.Module) -> RelativeMultiHeadAttention:
    """The module with m's arguments and parameters, on the source's device and dtype and in its mode."""
    ref = m.tensors["w_q"]
    t = m.tensors
    out = RelativeMultiHeadAttention(
        m.embed_dim, m.num_heads, head_dim=m.head_dim, scheme=m.scheme, scale=m.scale, dropout=m.dropout,
        bias="b_q" in t, relative_keys="rel_k" in t, relative_values=False, relative_queries="rel_q" in t,
        relative_bias="rel_bias" in t, share_relative_heads=t.get("rel_k", t.get("rel_q", ref)).dim() == 2,
        device=ref.device, dtype=ref.dtype,
    )
    params = dict(out.named_parameters())
    if set(params) != set(t):
        raise RuntimeError(f"internal: module parameters {sorted(params)} != imported {sorted(t)}")
    with torch.no_grad():
        for name, value in t.items():
            params[name].copy_(value)
    return out.train(source.training)


def _needs(layer, kind: str, *names: str) -> None:
    missing = [n for n in names if not hasattr(layer, n)]
    if not isinstance(layer, nn.Module) or missing:
        raise TypeError(f"expected a transformers {kind}, got {type(layer).__name__}"
                        + (f" (missing {', '.join(missing)})" if missing else ""))
