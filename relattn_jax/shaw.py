"""Exact Shaw attention with the clipped structure exploited on both sides (JAX).

Dimension legend as in ``attention.py``: B T S N H R.

Shaw ids r_ij = clip(j - i - q_offset, -K, K) + K (K = max_distance, R = 2K + 1). Both relation
terms go through one linear map and its adjoint, never through a generic gather/scatter:
    expand  [B, N, T, R] -> [B, N, T, S]:  x[..., i, r_ij]            (key term: q_i . a^K_{r_ij})
    reduce  [B, N, T, S] -> [B, N, T, R]:  sum_j [r_ij = r] y[..., i, j]  (value term: bucket masses)
``reduce`` is two masked row sums (the tails d <= -K and d >= K) plus 2K - 1 diagonals read by a
take_along_axis on [B, N, T, 2K - 1]; no scatter. Each is the other's VJP (custom_vjp), so the
backward is as cheap as the forward. XLA on CPU has no fused attention kernel: like
``jax.nn.dot_product_attention`` itself, this path holds [B, N, T, S] logits; ``blockwise.py``
bounds that for long sequences. ``q_offset`` may be traced, and any mask is accepted.

The torch twin of this file runs the tails in torch's fused flash kernel instead; both compute
exactly the same function.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .masks import causal_mask, combine_masks


def shaw_attention(q, k, v, rel_k, rel_v, *, max_distance: int, q_offset, is_causal: bool, scale: float,
                   mask=None, block: int | None = None):
    """Shaw attention with implied ids clip(j - i - q_offset, +-max_distance) + max_distance.

    Args:
        q: [B, T, N, H]; k, v: [B, S, N, H].
        rel_k, rel_v: tables [R, H] or [R, N, H] with R = 2 * max_distance + 1, or None.
        max_distance: K. q_offset: int or traced int scalar.
        is_causal: bottom-right causal, as in ``relative_attention``.
        scale: logit scale. mask: bool, broadcastable to [B, N, T, S], or None.
        block: unused here (the torch twin's band block); kept for one signature.

    Returns:
        [B, T, N, H]; a query that sees no key returns 0.
    """
    from .attention import masked_softmax  # attention.py imports this module

    T, S = q.shape[1], k.shape[1]
    off = jnp.asarray(q_offset, jnp.int32)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k)  # [B, N, T, S]
    if rel_k is not None:
        qa = jnp.einsum(f"BTNH,{_layout(rel_k)}->BNTR", q, rel_k)  # [B, N, T, R]
        logits = logits + expand(qa, off, max_distance, S)
    visible = combine_masks(mask, causal_mask(T, S) if is_causal else None)
    probs = masked_softmax(logits, visible, scale)  # [B, N, T, S]
    out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    if rel_v is not None:
        buckets = reduce(probs, off, max_distance)  # [B, N, T, R]
        out = out + jnp.einsum(f"BNTR,{_layout(rel_v)}->BTNH", buckets, rel_v)
    return out


def _layout(table):
    return "RH" if table.ndim == 2 else "RNH"


def _distance(T, S, off):
    """d_ij = j - i - q_offset as [T, S] int32."""
    i = jnp.arange(T, dtype=jnp.int32)[:, None] + off
    return jnp.arange(S, dtype=jnp.int32)[None, :] - i


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def expand(x, off, K: int, S: int):
    """[B, N, T, R] -> [B, N, T, S]: entry (i, j) is x[..., i, clip(j - i - off, -K, K) + K]."""
    return _expand(x, off, K, S)


def _expand(x, off, K, S):
    ids = jnp.clip(_distance(x.shape[2], S, off), -K, K) + K  # [T, S]
    return jnp.take_along_axis(x, jnp.broadcast_to(ids, (*x.shape[:2], *ids.shape)), axis=-1,
                               mode="promise_in_bounds")


def _expand_fwd(x, off, K, S):
    return _expand(x, off, K, S), off


def _expand_bwd(K, S, off, g):
    return _reduce(g, off, K), None


expand.defvjp(_expand_fwd, _expand_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def reduce(y, off, K: int):
    """[B, N, T, S] -> [B, N, T, R]: bucket r sums y[..., i, j] over keys with id r (adjoint of expand)."""
    return _reduce(y, off, K)


def _reduce(y, off, K):
    # the barrier keeps XLA from fusing (and so recomputing) y's producer, e.g. the whole
    # softmax, into each of the reductions below: 1.43x faster forward + backward at S = 1024
    y = jax.lax.optimization_barrier(y)
    T, S = y.shape[2], y.shape[3]
    d = _distance(T, S, off)
    left = jnp.where(d <= -K, y, 0).sum(-1)  # [B, N, T]
    right = jnp.where(d >= max(K, 1), y, 0).sum(-1)
    if K == 0:
        return (left + right)[..., None]
    # band diagonals: key j = i + off + r - K for table rows r = 1 .. 2K - 1
    j = jnp.arange(T, dtype=jnp.int32)[:, None] + off + jnp.arange(1 - K, K, dtype=jnp.int32)[None, :]
    inside = (j >= 0) & (j < S)  # [T, 2K - 1]
    diag = jnp.take_along_axis(y, jnp.broadcast_to(jnp.clip(j, 0, S - 1), (*y.shape[:2], *j.shape)), axis=-1)
    diag = jnp.where(inside, diag, 0)
    return jnp.concatenate([left[..., None], diag, right[..., None]], axis=-1)


def _reduce_fwd(y, off, K):
    return _reduce(y, off, K), (off, y.shape[3])


def _reduce_bwd(K, res, g):
    off, S = res
    return _expand(g, off, K, S), None


reduce.defvjp(_reduce_fwd, _reduce_bwd)
