"""Relative-position attention as pure functions on arrays (JAX).

Dimension legend (shared with ``relattn_torch/attention.py``):
    B batch, T query length, S key length, N heads, H head dim,
    R relation ids, E model width, I input features per head.

Equations (Shaw et al. 2018, relation-aware self-attention):
    e_ij = q_i . (k_j + a^K_ij) * scale
    alpha_i = softmax_j(e_ij) over the keys visible to query i
    z_i = sum_j alpha_ij (v_j + a^V_ij)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _spec
from .blockwise import blockwise_attention
from .dense import edge_key_term, edge_value_term
from .masks import causal_mask, combine_masks
from .positions import relative_position_ids
from .shaw import shaw_attention

_LOW_PRECISION = (jnp.float16, jnp.bfloat16)
IMPLEMENTATIONS = ("auto", "reference", "shaw", "blockwise")
# "auto" switches to the linear-memory blockwise path once B * N * T * S reaches this
# (2**27 float32 logits = 512 MiB per [B, N, T, S] array).
LONG_SEQUENCE_THRESHOLD = 2**27


def relative_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rel_k: jax.Array | None = None,
    rel_v: jax.Array | None = None,
    *,
    rel_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_rng: jax.Array | None = None,
    max_distance: int | None = None,
    q_offset: int | jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Multi-head attention with relative key and value terms.

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, N, H].
        v: values [B, S, N, H].
        rel_k: key-side relation term a^K, or None. Dense form (``rel_ids is None``):
            edge tensor [T, S, H] (shared by heads), [T, S, N, H] or [B, T, S, N, H]
            (size-1 B, T, S, N broadcast). Table form: [R, H] or [R, N, H].
        rel_v: value-side relation term a^V, same forms as ``rel_k``, or None.
        rel_ids: int relation ids [T, S] or [B, T, S] with values in [0, R); selects
            the table form, where a_ij = table[rel_ids[i, j]].
        mask: bool, broadcastable to [B, N, T, S]; True means the query may attend the key.
        is_causal: key j is visible to query i iff j <= i + (S - T) (bottom-right
            aligned, so it stays right when the keys include a cache). Combines with mask.
        scale: logit scale; default 1 / sqrt(H).
        dropout_p: dropout probability on the attention weights (0 disables it).
        dropout_rng: PRNG key, required when ``dropout_p > 0``.
        max_distance: the Shaw form without an id array: rel_k / rel_v are tables
            [R, H] or [R, N, H] with R = 2 * max_distance + 1 and the ids are
            clip(j - i - q_offset, -max_distance, max_distance) + max_distance, as
            ``relative_position_ids`` makes them. Excludes ``rel_ids``.
        q_offset: position of query 0 among the keys for those ids (int or traced
            int); default S - T. Only with ``max_distance``.
        implementation: None or "auto" picks the fastest exact path for the inputs;
            "reference" the einsum path written out here; "shaw" the Shaw path
            (``shaw.py``: the clipped ids as one expand/reduce pair, no gather or
            scatter; needs ``max_distance`` and no dropout); "blockwise" the
            linear-memory query-blocked path (``blockwise.py``), which "auto" uses
            once B * N * T * S reaches ``LONG_SEQUENCE_THRESHOLD``.

    Returns:
        [B, T, N, H], dtype of q. A query that sees no key returns exactly 0.
    """
    d = _check(q, k, v, rel_k, rel_v, rel_ids, mask, shaw=max_distance is not None)
    _spec.check_shaw(_shape(rel_k), _shape(rel_v), rel_ids is not None, max_distance, q_offset is not None, d)
    if max_distance is not None and q_offset is None:
        q_offset = d.S - d.T  # the queries are the last T key positions
    scale = d.H**-0.5 if scale is None else scale
    impl = _choose(implementation, rel_ids, dropout_p, max_distance, d)
    if impl == "shaw":
        return shaw_attention(q, k, v, rel_k, rel_v, max_distance=max_distance, q_offset=q_offset,
                              is_causal=is_causal, scale=scale, mask=mask)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, rel_k, rel_v, rel_ids=rel_ids, mask=mask, is_causal=is_causal,
                                   scale=scale, dropout_p=dropout_p, dropout_rng=dropout_rng,
                                   max_distance=max_distance, q_offset=q_offset)
    if max_distance is not None:
        rel_ids = relative_position_ids(d.T, d.S, max_distance, q_offset=q_offset)

    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k)  # [B, N, T, S]
    if rel_k is not None:
        logits = logits + _key_term(q, rel_k, rel_ids, d)
    visible = combine_masks(mask, causal_mask(d.T, d.S) if is_causal else None)
    probs = masked_softmax(logits, visible, scale)  # [B, N, T, S]
    if dropout_p > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rng must be a PRNG key when dropout_p > 0")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_p, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_p), 0.0).astype(probs.dtype)

    out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    if rel_v is not None:
        out = out + _value_term(probs, rel_v, rel_ids, d)
    return out


def masked_softmax(logits: jax.Array, visible: jax.Array | None, scale: float) -> jax.Array:
    """softmax(logits * scale) over the last axis, in float32 for half inputs.

    Masked entries get the dtype's most negative finite value (no -inf, no -1e20
    overflow in half precision); rows with no visible entry come out as zeros.
    Returns the input dtype.
    """
    x = logits.astype(jnp.float32) if logits.dtype in _LOW_PRECISION else logits
    x = x * scale
    if visible is not None:
        x = jnp.where(visible, x, jnp.finfo(x.dtype).min)
    probs = jax.nn.softmax(x, axis=-1)
    if visible is not None:
        probs = jnp.where(visible, probs, 0.0)
    return probs.astype(logits.dtype)


def _key_term(q, rel_k, rel_ids, d) -> jax.Array:
    """q_i . a^K_ij as [B, N, T, S]."""
    if rel_ids is None:
        letters, edges = _edges("rel_k", rel_k, d)
        return edge_key_term(q, edges, letters)
    layout = _spec.table_layout("rel_k", tuple(rel_k.shape), d)
    q_rel = jnp.einsum(f"BTNH,{layout}->BNTR", q, rel_k)  # [B, N, T, R]
    return jnp.take_along_axis(q_rel, _index(rel_ids, d), axis=-1)


def _value_term(probs, rel_v, rel_ids, d) -> jax.Array:
    """sum_j alpha_ij a^V_ij as [B, T, N, H]."""
    if rel_ids is None:
        letters, edges = _edges("rel_v", rel_v, d)
        return edge_value_term(probs, edges, letters)
    layout = _spec.table_layout("rel_v", tuple(rel_v.shape), d)
    b, n, t = np.ogrid[: d.B, : d.N, : d.T]
    buckets = jnp.zeros((d.B, d.N, d.T, rel_v.shape[0]), probs.dtype)  # [B, N, T, R]
    buckets = buckets.at[b[..., None], n[..., None], t[..., None], _index(rel_ids, d)].add(probs)
    return jnp.einsum(f"BNTR,{layout}->BTNH", buckets, rel_v)


def _edges(name, edges, d):
    """A dense edge tensor and its einsum letters; size-1 T/S dims are broadcast."""
    letters, squeezed, target = _spec.dense_edge_layout(name, tuple(edges.shape), d)
    return letters, jnp.broadcast_to(edges.reshape(squeezed), target)


def _index(rel_ids, d) -> jax.Array:
    """rel_ids [T, S] or [B, T, S] as an index [B, N, T, S]."""
    ids = rel_ids.reshape(1, 1, d.T, d.S) if rel_ids.ndim == 2 else rel_ids.reshape(rel_ids.shape[0], 1, d.T, d.S)
    return jnp.broadcast_to(ids, (d.B, d.N, d.T, d.S))


def _shape(x):
    return None if x is None else tuple(x.shape)


def _check(q, k, v, rel_k, rel_v, rel_ids, mask, shaw=False) -> _spec.Dims:
    d = _spec.check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    named = [("q", q.dtype), ("k", k.dtype), ("v", v.dtype)]
    named += [(n, t.dtype) for n, t in (("rel_k", rel_k), ("rel_v", rel_v)) if t is not None]
    _spec.check_float_dtypes(named, lambda dt: jnp.issubdtype(dt, jnp.floating))
    _spec.check_rel_args(rel_k, rel_v, rel_ids)
    if rel_ids is not None:
        if not jnp.issubdtype(rel_ids.dtype, jnp.integer):
            raise TypeError(f"rel_ids must be an integer array, got dtype {rel_ids.dtype}")
        _spec.check_rel_ids_shape(tuple(rel_ids.shape), d)
        tables = [(n, t) for n, t in (("rel_k", rel_k), ("rel_v", rel_v)) if t is not None]
        for name, table in tables:
            _spec.table_layout(name, tuple(table.shape), d)
        if not isinstance(rel_ids, jax.core.Tracer) and rel_ids.size:
            ids = np.asarray(rel_ids)
            _spec.check_rel_ids_range(int(ids.min()), int(ids.max()), [(n, t.shape[0]) for n, t in tables])
    elif not shaw:  # the Shaw tables are checked by _spec.check_shaw
        for name, edges in (("rel_k", rel_k), ("rel_v", rel_v)):
            if edges is not None:
                _spec.dense_edge_layout(name, tuple(edges.shape), d)
    if mask is not None:
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be a bool array (True = may attend), got dtype {mask.dtype}")
        _spec.check_mask_shape(tuple(mask.shape), d)
    return d


def _choose(implementation, rel_ids, dropout_p, max_distance, d) -> str:
    """The implementation to run: the named one, or for "auto" the fastest exact one."""
    impl = "auto" if implementation is None else implementation
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    shaw_ok = max_distance is not None and dropout_p == 0.0
    if impl == "shaw" and not shaw_ok:
        raise ValueError("implementation='shaw' needs max_distance and dropout_p=0; use 'auto' to fall back")
    if impl != "auto":
        return impl
    if d.B * d.N * d.T * d.S >= LONG_SEQUENCE_THRESHOLD:
        return "blockwise"
    return "shaw" if shaw_ok else "reference"
