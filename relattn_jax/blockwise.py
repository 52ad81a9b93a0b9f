"""Linear-memory relative attention: query blocks, each recomputed in the backward (JAX).

Why this twin differs: ``lax.map`` traces one block body, so every block must have the same
shape: the rows are zero-padded to whole blocks and each block's rows are cut with
``dynamic_slice``. In the Shaw form (without dropout, rel_q, rel_bias or alibi_slopes) each block takes this
package's Shaw path, which accepts the block's causal rows as a mask. The torch twin loops over
blocks in Python, with a shorter last block, and every block takes the einsum path (its Shaw
path takes no mask).

Dimension legend as in ``attention.py``: B T S N H R.

The queries are cut into blocks of ``BLOCK_ROWS`` rows (the last one zero-padded). ``lax.map``
runs one block at a time under ``jax.checkpoint``: each block computes its rows exactly as the
``shaw`` / ``einsum`` paths do (its slice of rel_ids / dense edges / mask, its own causal rows
and Shaw offset), and the backward recomputes it, so only one block's [B, N, block, S] logits
exist at a time: peak memory is O(B N block S + B (T + S) N H), linear in S for a fixed block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp

from . import _spec
from .einsum import AttentionArgs, einsum_attention
from .masks import causal_mask, combine_masks
from .shaw import shaw_attention

BLOCK_ROWS = 256  # query rows per block: [B, N, 256, S] logits at a time


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, args: AttentionArgs) -> jax.Array:
    """The einsum (or Shaw) path computed ``BLOCK_ROWS`` query rows at a time, each block recomputed in the backward.

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, N_kv, H] (N_kv divides N).
        v: values [B, S, N_kv, H].
        args: the checked arguments of the call (``relative_attention`` makes them).

    Returns:
        [B, T, N, H], equal to the einsum path's result.
    """
    B, T, N, H = q.shape
    bq = max(1, min(BLOCK_ROWS, T))
    nblk = -(-T // bq)
    padded = _Padded.of(q, args, nblk * bq)
    shaw_form = (args.max_distance is not None and args.dropout_p == 0.0 and args.rel_q is None
                 and args.rel_bias is None and args.alibi_slopes is None)
    path = shaw_attention if shaw_form else einsum_attention

    def one_block(c):
        block_args = padded.rows(args, c * bq, bq, k.shape[1], T)
        if args.dropout_rng is not None:
            block_args = replace(block_args, dropout_rng=jax.random.fold_in(args.dropout_rng, c))
        return path(jax.lax.dynamic_slice_in_dim(padded.q, c * bq, bq, 1), k, v, block_args)  # [B, bq, N, H]

    out = jax.lax.map(jax.checkpoint(one_block), jnp.arange(nblk))  # [nblk, B, bq, N, H]
    return jnp.moveaxis(out, 0, 1).reshape(B, nblk * bq, N, H)[:, :T]


@dataclass(frozen=True)
class _Padded:
    """q and the per-row arguments (rel_ids, dense edges with a T axis, mask rows) zero-padded to whole blocks."""

    q: jax.Array
    rel_k: jax.Array | None
    rel_v: jax.Array | None
    rel_ids: jax.Array | None
    mask: jax.Array | None
    mask_rows: bool  # the mask has T rows (cut per block); else every block uses it whole
    edge_axes: dict  # {"rel_k" / "rel_v": the T axis of a dense edge tensor with T rows}

    @classmethod
    def of(cls, q, args: AttentionArgs, total: int):
        T = q.shape[1]
        edges = {"rel_k": args.rel_k, "rel_v": args.rel_v}
        axes = {}
        if args.rel_ids is None and args.max_distance is None and args.scheme is None:  # dense edges: their T rows
            axes = {n: _spec.dense_t_axis(e.ndim) for n, e in edges.items() if e is not None}
            axes = {n: a for n, a in axes.items() if edges[n].shape[a] == T}
        edges = {n: (_pad_rows(e, axes[n], total) if n in axes else e) for n, e in edges.items()}
        ids = None if args.rel_ids is None else _pad_rows(args.rel_ids, args.rel_ids.ndim - 2, total)
        mask = args.mask
        mask_rows = mask is not None and mask.ndim >= 2 and mask.shape[-2] == T and T > 1
        if mask_rows:
            mask = _pad_rows(mask, mask.ndim - 2, total, False)
        return cls(_pad_rows(q, 1, total), edges["rel_k"], edges["rel_v"], ids, mask, mask_rows, axes)

    def rows(self, args: AttentionArgs, i0, bq: int, S: int, T: int) -> AttentionArgs:
        """The arguments for query rows [i0, i0 + bq) (i0 may be traced); the causal rows join the mask."""
        cut = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, i0, bq, axis)  # noqa: E731
        rel = {n: (cut(e, self.edge_axes[n]) if n in self.edge_axes else e)
               for n, e in (("rel_k", self.rel_k), ("rel_v", self.rel_v))}
        ids = None if self.rel_ids is None else cut(self.rel_ids, self.rel_ids.ndim - 2)
        mask = cut(self.mask, self.mask.ndim - 2) if self.mask_rows else self.mask
        if args.is_causal:  # rows i0.. of the bottom-right causal mask
            mask = combine_masks(mask, causal_mask(bq, S, q_offset=S - T + i0))
        q_offset = None if args.q_offset is None else args.q_offset + i0
        return replace(args, rel_k=rel["rel_k"], rel_v=rel["rel_v"], rel_ids=ids, mask=mask, is_causal=False,
                       q_offset=q_offset)


def _pad_rows(x, axis, total, value=0):
    extra = total - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
