"""Exact Shaw attention with the clipped structure exploited on both sides (JAX).

Why this twin differs: the torch twin runs the clipped tails in torch's fused CPU flash
kernel and only the band by hand, so it never holds [B, N, T, S] logits, but that kernel takes
only a key-padding mask, no dropout, only CPU float32/float64 and an int q_offset. XLA has no such kernel, so
here both relation terms are one expand / reduce pair over the full logits, which works on any
backend and dtype with any mask and a traced q_offset. Both compute exactly the same function.

Dimension legend as in ``attention.py``: B T S N H R.

Shaw ids r_ij = clip(j - i - q_offset, -K, K) + K (K = max_distance, R = 2K + 1). Both relation
terms go through one linear map and its adjoint, never through a generic gather/scatter:
    expand  [B, N, T, R] -> [B, N, T, S]:  x[..., i, r_ij]            (key term: q_i . a^K_{r_ij})
    reduce  [B, N, T, S] -> [B, N, T, R]:  sum_j [r_ij = r] y[..., i, j]  (value term: bucket masses)
``_expand`` is a gather batched over T with one [T, S] index array; ``_reduce`` is one plain
reduction into blocks of keys plus gathers of a window of < 2K + 2 * 64 keys per row; no
scatter. The attention has a custom VJP (``_shaw_bwd``), written so that XLA keeps fewer
[B, N, T, S] arrays than automatic differentiation through the softmax, expand and reduce
does (each such array also costs page faults on every step). XLA on CPU has no fused attention
kernel: like ``jax.nn.dot_product_attention`` itself, this path holds [B, N, T, S] logits;
``blockwise.py`` bounds that for long sequences. ``q_offset`` may be traced, and any mask is
accepted.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .einsum import AttentionArgs, masked_softmax
from .masks import causal_mask, combine_masks

_KEY_BLOCK = 64  # keys per block for the tail sums of ``reduce`` (a divisor of S up to this)


def shaw_attention(q: jax.Array, k: jax.Array, v: jax.Array, args: AttentionArgs) -> jax.Array:
    """Shaw attention with implied ids clip(j - i - q_offset, +-max_distance) + max_distance.

    Grouped k, v (N_kv heads) are repeated to N heads first: an explicit [B, S, N, H] copy each,
    small beside the [B, N, T, S] logits this path holds; the VJP of the repeat sums back.

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, N_kv, H] (N_kv divides N).
        v: values [B, S, N_kv, H].
        args: the checked arguments of the call, in the Shaw form: tables ``rel_k`` / ``rel_v``
            [R, H] or [R, N, H] with R = 2 * max_distance + 1, ``q_offset`` an int or traced int
            scalar, any mask, no dropout.

    Returns:
        [B, T, N, H]; a query that sees no key returns 0.
    """
    if args.dropout_p > 0.0 or args.max_distance is None:
        raise ValueError("the Shaw path takes max_distance and no dropout")
    T, S, N = q.shape[1], k.shape[1], q.shape[2]
    if k.shape[2] != N:  # grouped heads: repeated to N (this path's einsums pair heads one to one)
        k, v = (jnp.repeat(t, N // k.shape[2], axis=2) for t in (k, v))
    off = jnp.asarray(args.q_offset, jnp.int32)
    visible = combine_masks(args.mask, causal_mask(T, S) if args.is_causal else None)
    return _shaw(q, k, v, args.rel_k, args.rel_v, off, visible, args.max_distance, args.scale)


@partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _shaw(q, k, v, rel_k, rel_v, off, visible, K, scale):
    return _shaw_fwd(q, k, v, rel_k, rel_v, off, visible, K, scale)[0]


def _shaw_fwd(q, k, v, rel_k, rel_v, off, visible, K, scale):
    # the scale goes on q: XLA on CPU would broadcast it to a full [B, N, T, S] array to fuse it.
    # Half inputs: the logits and the softmax in float32, the value products in the inputs' dtype.
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qs = q.astype(acc) * jnp.asarray(scale, acc)
    logits = jnp.einsum("BTNH,BSNH->BNTS", qs, k.astype(acc))  # [B, N, T, S], scaled
    if rel_k is not None:
        qa = jnp.einsum(f"BTNH,{_layout(rel_k)}->BNTR", qs, rel_k.astype(acc))  # [B, N, T, R]
        logits = logits + _expand(qa, off, K, k.shape[1])
    probs = masked_softmax(logits, visible, 1.0).astype(q.dtype)  # [B, N, T, S]
    out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    buckets = None
    if rel_v is not None:
        buckets = _reduce(probs, off, K)  # [B, N, T, R]
        out = out + jnp.einsum(f"BNTR,{_layout(rel_v)}->BTNH", buckets, rel_v)
    return out, (q, k, v, rel_k, rel_v, off, visible, probs, buckets, out)


def _shaw_bwd(K, scale, res, g):
    """The attention backward written out: the saved probabilities, dp and the logits' cotangent
    ds are its only [B, N, T, S] arrays besides the expanded value-table term, where autodiff through
    the softmax, expand and reduce kept more. Uses sum_j p_ij dp_ij = g_i . z_i (z_i the whole
    output, value term included)."""
    q, k, v, rel_k, rel_v, off, visible, probs, buckets, out = res
    dv = jnp.einsum("BNTS,BTNH->BSNH", probs, g)
    dp = jnp.einsum("BTNH,BSNH->BNTS", g, v)  # [B, N, T, S]
    drel_v = None
    if rel_v is not None:
        dp = dp + _expand(jnp.einsum(f"BTNH,{_layout(rel_v)}->BNTR", g, rel_v), off, K, k.shape[1])
        drel_v = jnp.einsum(f"BNTR,BTNH->{_layout(rel_v)}", buckets, g).astype(rel_v.dtype)
    acc = jnp.promote_types(probs.dtype, jnp.float32)  # half inputs: the softmax backward in float32
    row = jnp.einsum("BTNH,BTNH->BNT", g.astype(acc), out.astype(acc))[..., None]  # sum_j p_ij dp_ij
    ds = (probs.astype(acc) * (dp.astype(acc) - row) * scale).astype(dp.dtype)  # d logits [B, N, T, S]
    dq = jnp.einsum("BNTS,BSNH->BTNH", ds, k)
    dk = jnp.einsum("BNTS,BTNH->BSNH", ds, q)
    drel_k = None
    if rel_k is not None:
        dqa = _reduce(ds, off, K)  # [B, N, T, R]
        dq = dq + jnp.einsum(f"BNTR,{_layout(rel_k)}->BTNH", dqa, rel_k)
        drel_k = jnp.einsum(f"BNTR,BTNH->{_layout(rel_k)}", dqa, q).astype(rel_k.dtype)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), drel_k, drel_v, None, None)


_shaw.defvjp(_shaw_fwd, _shaw_bwd)


def _layout(table):
    return "RH" if table.ndim == 2 else "RNH"


def _distance(T, S, off):
    """d_ij = j - i - q_offset as [T, S] int32."""
    i = jnp.arange(T, dtype=jnp.int32)[:, None] + off
    return jnp.arange(S, dtype=jnp.int32)[None, :] - i


def _expand(x, off, K, S):
    """[B, N, T, R] -> [B, N, T, S]: entry (i, j) is x[..., i, clip(j - i - off, -K, K) + K]."""
    ids = jnp.clip(_distance(x.shape[2], S, off), -K, K) + K  # [T, S]
    return _take_rows(x, ids)


def _take_rows(x, idx):
    """x [B, N, T, M], idx [T, W] -> [B, N, T, W]: entry (t, w) is x[..., t, idx[t, w]].

    A gather batched over T (vmap) with the one [T, W] index array: take_along_axis with the index
    broadcast to [B, N, T, W] makes XLA build full coordinates, an int32 [B, N, T, W, 4] array,
    which it materialises once the forward and the backward share it (4x the logits' memory).
    """
    out = jax.vmap(lambda row, i: row[:, :, i])(jnp.moveaxis(x, 2, 0), idx)  # [T, B, N, W]
    return jnp.moveaxis(out, 0, 2)


def _reduce(y, off, K):
    """[B, N, T, S] -> [B, N, T, R]: bucket r sums y[..., i, j] over keys with id r (the adjoint of ``_expand``)."""
    # The tails are not summed as where(mask, y, 0).sum(-1): XLA on CPU materialises that select
    # as a full [B, N, T, S] array before reducing it.
    # Instead one plain reduce gives sums over blocks of ``cb`` keys, the blocks wholly inside a
    # tail are added from those ([B, N, T, S / cb]), and a gathered window of < 2K + 2cb keys per
    # row holds the two partial blocks and the band.
    T, S = y.shape[2], y.shape[3]
    cb = max(c for c in range(1, _KEY_BLOCK + 1) if S % c == 0)  # keys per block
    i = jnp.arange(T, dtype=jnp.int32)[:, None] + off  # [T, 1]
    last_left, first_right = i - K, i + max(K, 1)  # tails: keys <= last_left, keys >= first_right
    n_left = jnp.clip((last_left + 1) // cb, 0, S // cb)  # blocks wholly in the left tail
    n_mid = jnp.clip(-(-first_right // cb), 0, S // cb)  # blocks before the first wholly right one
    c = jnp.arange(S // cb, dtype=jnp.int32)[None, :]
    blocks = y.reshape(*y.shape[:3], S // cb, cb).sum(-1)  # [B, N, T, S / cb]
    left = jnp.where(c < n_left, blocks, 0).sum(-1)  # [B, N, T]
    right = jnp.where(c >= n_mid, blocks, 0).sum(-1)
    j = n_left * cb + jnp.arange(2 * K + 2 * cb, dtype=jnp.int32)[None, :]  # [T, W] window keys
    window = _take_rows(y, jnp.clip(j, 0, S - 1))
    window = jnp.where(j < n_mid * cb, window, 0)  # keys of whole right blocks are counted already
    left = left + jnp.where(j <= last_left, window, 0).sum(-1)
    right = right + jnp.where(j >= first_right, window, 0).sum(-1)
    if K == 0:
        return (left + right)[..., None]
    # band diagonals: key j = i + off + r - K for table rows r = 1 .. 2K - 1
    j = i + jnp.arange(1 - K, K, dtype=jnp.int32)[None, :]
    inside = (j >= 0) & (j < S)  # [T, 2K - 1]
    diag = _take_rows(y, jnp.clip(j, 0, S - 1))
    diag = jnp.where(inside, diag, 0)
    return jnp.concatenate([left[..., None], diag, right[..., None]], axis=-1)
