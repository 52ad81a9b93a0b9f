"""The einsum path: the equations written out over [B, N, T, S] logits (JAX).

Dimension legend as in ``attention.py``: B T S N H R; grouped key/value heads (k, v
[B, S, N_kv, H]) write the key/value head axis as K and the query heads per key/value head as
G (N = K * G, query head n = K-head n // G, as gemma's ``'BTKGH,BSKH->BTKGS'``), so no repeated
copy of k or v is made.

Every path of ``relative_attention`` receives the checked arguments of one call as an
``AttentionArgs``; this module defines it, the einsum path and ``masked_softmax``. It imports
nothing from ``attention.py``: the other paths (``blockwise.py``, ``shaw.py``) call these pure
functions directly, so no check runs twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from . import _spec
from .dense import edge_key_term, edge_value_term
from .masks import causal_mask, combine_masks
from .buckets import _Scheme, relative_positions
from .positions import relative_position_ids

_LOW_PRECISION = (jnp.float16, jnp.bfloat16)


@dataclass(frozen=True)
class AttentionArgs:
    """The arguments of one ``relative_attention`` call besides q, k, v, checked and resolved.

    ``relative_attention`` builds it once per call and hands it to the path it chose; the
    fields mean what the arguments of ``relative_attention`` mean, with ``scale`` resolved to
    a number and, in the Shaw form, ``q_offset`` resolved to S - T when none was given.
    ``dropout_rng`` is this twin's own field (torch draws from its global generator).
    """

    rel_k: jax.Array | None = None
    rel_v: jax.Array | None = None
    rel_ids: jax.Array | None = None
    mask: jax.Array | None = None
    is_causal: bool = False
    scale: float = 1.0
    dropout_p: float = 0.0
    max_distance: int | None = None
    q_offset: int | jax.Array | None = None
    dropout_rng: jax.Array | None = None
    rel_q: jax.Array | None = None
    rel_bias: jax.Array | None = None
    scheme: _Scheme | None = None  # a bucket scheme other than ShawBuckets (that one is max_distance)
    alibi_slopes: jax.Array | None = None


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, args: AttentionArgs) -> jax.Array:
    """Relative attention by einsums over the full [B, N, T, S] logits; no input checks.

    Table and Shaw ids gather ``q . table`` and scatter the probabilities into table buckets
    ([B, N, T, R] products, never a [B, N, T, S, H] array); dense edges with a head axis go
    through ``dense.py``'s GEMMs; grouped k, v are read in place by grouped einsums.

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, N_kv, H] (N_kv divides N).
        v: values [B, S, N_kv, H].
        args: the checked arguments of the call (``relative_attention`` makes them).

    Returns:
        [B, T, N, H], dtype of q. A query that sees no key returns exactly 0.
    """
    d = _spec.Dims(B=q.shape[0], T=q.shape[1], S=k.shape[1], N=q.shape[2], H=q.shape[3], N_kv=k.shape[2])
    rel_ids = _ids(args, d)

    # half inputs: the logits and the softmax in float32 (rounding the logits to bf16 first
    # errs by 1e-1 where q . k ~ 1e3, and fp16 overflows); the value products in the inputs' dtype
    acc = jnp.float32 if q.dtype in _LOW_PRECISION else q.dtype
    logits = _scores(q.astype(acc), k.astype(acc), d)  # [B, N, T, S]
    if args.rel_k is not None:
        logits = logits + _key_term(q.astype(acc), args.rel_k.astype(acc), rel_ids, d)
    if args.rel_q is not None:
        logits = logits + _query_term(k.astype(acc), args.rel_q.astype(acc), rel_ids, d)
    visible = combine_masks(args.mask, causal_mask(d.T, d.S) if args.is_causal else None)
    after = _after_scale(args, rel_ids, d, acc)
    if after is None:
        probs = masked_softmax(logits, visible, args.scale)  # [B, N, T, S]
    else:  # the bias and ALiBi come after the scale (T5 passes scale=1.0)
        probs = masked_softmax(logits * args.scale + after, visible, 1.0)
    if args.dropout_p > 0.0:
        keep = jax.random.bernoulli(args.dropout_rng, 1.0 - args.dropout_p, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - args.dropout_p), 0.0).astype(probs.dtype)
    probs = probs.astype(q.dtype)

    out = _mix(probs, v, d)
    if args.rel_v is not None:
        out = out + _value_term(probs, args.rel_v, rel_ids, d)
    return out


def _ids(args: AttentionArgs, d) -> jax.Array | None:
    """The relation ids [T, S] or [B, T, S] of the call: given, Shaw's or the scheme's (None: dense edges)."""
    if args.max_distance is not None:
        return relative_position_ids(d.T, d.S, args.max_distance, q_offset=args.q_offset)
    if args.scheme is not None:
        return args.scheme.ids(d.T, d.S, args.q_offset)
    return args.rel_ids


def _scores(q, k, d) -> jax.Array:
    """q_i . k_j as [B, N, T, S]; grouped k [B, S, K, H] read in place."""
    if d.groups == 1:
        return jnp.einsum("BTNH,BSNH->BNTS", q, k)
    qg = q.reshape(d.B, d.T, d.kv_heads, d.groups, d.H)
    return jnp.einsum("BTKGH,BSKH->BKGTS", qg, k).reshape(d.B, d.N, d.T, d.S)


def _mix(probs, v, d) -> jax.Array:
    """sum_j alpha_ij v_j as [B, T, N, H]; grouped v [B, S, K, H] read in place."""
    if d.groups == 1:
        return jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    pg = probs.reshape(d.B, d.kv_heads, d.groups, d.T, d.S)
    return jnp.einsum("BKGTS,BSKH->BTKGH", pg, v).reshape(d.B, d.T, d.N, d.H)


def _after_scale(args: AttentionArgs, rel_ids, d, acc) -> jax.Array | None:
    """b[r_ij, n] - m_n |j - i - q_offset|, broadcastable to [B, N, T, S], or None without either term."""
    out = None
    if args.rel_bias is not None:
        out = _bias_term(args.rel_bias.astype(acc), rel_ids, d)
    if args.alibi_slopes is not None:
        distance = jnp.abs(relative_positions(d.T, d.S, args.q_offset)).astype(acc)  # [T, S]
        alibi = -args.alibi_slopes.astype(acc)[:, None, None] * distance  # [N, T, S]
        out = alibi if out is None else out + alibi
    return out


def masked_softmax(logits: jax.Array, visible: jax.Array | None, scale: float) -> jax.Array:
    """softmax(logits * scale) over the last axis, in float32 for half inputs.

    Masked entries get the dtype's most negative finite value (no -inf, no -1e20
    overflow in half precision); rows with no visible entry come out as zeros.

    Args:
        logits: attention logits [..., S], e.g. [B, N, T, S].
        visible: bool, broadcastable to ``logits``; True where the entry may be attended.
            None means every entry is visible.
        scale: factor applied to the logits before the softmax.

    Returns:
        The probabilities, shape and dtype of ``logits``; exactly 0 where not visible.
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


def _query_term(k, rel_q, rel_ids, d) -> jax.Array:
    """k_j . a^Q[r_ij] as [B, N, T, S]: k . table per key and id ([B, N, R, S]), gathered along R at each (i, j)."""
    layout = _spec.table_layout("rel_q", tuple(rel_q.shape), d)
    if d.groups == 1:
        k_rel = jnp.einsum(f"BSNH,{layout}->BNRS", k, rel_q)  # [B, N, R, S]
    elif layout == "RH":  # one table for every head: [B, K, R, S], the same for the G heads of a group
        k_rel = jnp.einsum("BSKH,RH->BKRS", k, rel_q)[:, :, None]
        k_rel = jnp.broadcast_to(k_rel, (d.B, d.kv_heads, d.groups, *k_rel.shape[-2:])).reshape(d.B, d.N, -1, d.S)
    else:
        rq = rel_q.reshape(rel_q.shape[0], d.kv_heads, d.groups, d.H)
        k_rel = jnp.einsum("BSKH,RKGH->BKGRS", k, rq).reshape(d.B, d.N, -1, d.S)
    return jnp.take_along_axis(k_rel, _index(rel_ids, d), axis=-2)


def _bias_term(rel_bias, rel_ids, d) -> jax.Array:
    """b[r_ij, n] as [N, T, S] or [B, N, T, S]."""
    taken = rel_bias.T[:, rel_ids]  # [N, T, S] or [N, B, T, S]
    return taken if rel_ids.ndim == 2 else jnp.moveaxis(taken, 0, 1)


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
