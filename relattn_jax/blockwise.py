"""Linear-memory relative attention: query blocks, each recomputed in the backward (JAX).

Dimension legend as in ``attention.py``: B T S N H R.

The queries are cut into blocks of ``block`` rows (the last one zero-padded). ``lax.map`` runs
one block at a time under ``jax.checkpoint``: each block computes its rows exactly as the
``shaw`` / ``reference`` paths do (its slice of rel_ids / dense edges / mask, its own causal rows
and Shaw offset), and the backward recomputes it, so only one block's [B, N, block, S] logits
exist at a time: peak memory is O(B N block S + B (T + S) N H), linear in S for a fixed block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _spec
from .masks import causal_mask, combine_masks

BLOCK_ROWS = 256  # query rows per block: [B, N, 256, S] logits at a time


def blockwise_attention(q, k, v, rel_k=None, rel_v=None, *, rel_ids=None, mask=None, is_causal=False,
                        scale=None, dropout_p=0.0, dropout_rng=None, max_distance=None, q_offset=None,
                        block: int | None = None):
    """``relative_attention`` computed ``block`` query rows at a time; same arguments and result.

    Args:
        q: [B, T, N, H]; k, v: [B, S, N, H]; rel_k, rel_v, rel_ids, mask, is_causal, scale,
            dropout_p, dropout_rng, max_distance: as in ``relative_attention``.
        q_offset: with ``max_distance``, the resolved offset of query 0 (``relative_attention``
            passes S - T when the caller gave none).
        block: query rows per block; default ``BLOCK_ROWS``.

    Returns:
        [B, T, N, H].
    """
    from .attention import relative_attention  # attention.py imports this module

    B, T, N, H = q.shape
    S = k.shape[1]
    bq = max(1, min(BLOCK_ROWS if block is None else block, T))
    nblk = -(-T // bq)
    d = _spec.Dims(B=B, T=T, S=S, N=N, H=H)
    pad = lambda x, axis, value=0: _pad_rows(x, axis, nblk * bq, value)  # noqa: E731
    q_p = pad(q, 1)
    ids_p = None if rel_ids is None else pad(rel_ids, rel_ids.ndim - 2)
    edge_axes = {}
    if rel_ids is None and max_distance is None:  # dense edges: slice their T dim unless it broadcasts
        edge_axes = {n: _spec.dense_t_axis(e.ndim) for n, e in (("rel_k", rel_k), ("rel_v", rel_v)) if e is not None}
        edge_axes = {n: a for n, a in edge_axes.items() if (rel_k if n == "rel_k" else rel_v).shape[a] == T}
    rel = {"rel_k": rel_k, "rel_v": rel_v}
    rel = {n: (pad(e, edge_axes[n]) if n in edge_axes else e) for n, e in rel.items()}
    mask_rows = mask is not None and mask.ndim >= 2 and mask.shape[-2] == T and T > 1
    mask_p = pad(mask, mask.ndim - 2, False) if mask_rows else mask
    impl = "shaw" if max_distance is not None and dropout_p == 0.0 else "reference"

    def one_block(c):
        i0 = c * bq
        rows = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, i0, bq, axis)  # noqa: E731
        edges = {n: (rows(e, edge_axes[n]) if n in edge_axes else e) for n, e in rel.items()}
        m = rows(mask_p, mask_p.ndim - 2) if mask_rows else mask_p
        if is_causal:  # rows i0.. of the bottom-right causal mask
            m = combine_masks(m, causal_mask(bq, S, q_offset=S - T + i0))
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, c)
        return relative_attention(
            rows(q_p, 1), k, v, edges["rel_k"], edges["rel_v"],
            rel_ids=None if ids_p is None else rows(ids_p, ids_p.ndim - 2), mask=m, scale=scale,
            dropout_p=dropout_p, dropout_rng=rng, max_distance=max_distance,
            q_offset=None if q_offset is None else q_offset + i0, implementation=impl,
        )  # [B, bq, N, H]

    out = jax.lax.map(jax.checkpoint(one_block), jnp.arange(nblk))  # [nblk, B, bq, N, H]
    return jnp.moveaxis(out, 0, 1).reshape(B, nblk * bq, N, H)[:, :T]


def _pad_rows(x, axis, total, value=0):
    extra = total - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
