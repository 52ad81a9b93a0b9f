"""Linear-memory relative attention: query blocks, each recomputed in the backward (PyTorch).

Dimension legend as in ``attention.py``: B T S N H R.

The queries are cut into blocks of ``block`` rows. Each block runs the reference einsum path
on its rows (its slice of rel_ids / dense edges / mask, its own causal rows and Shaw offset)
under activation checkpointing, so only one block's [B, N, block, S] logits exist at a time,
forward or backward: peak memory is O(B N block S + B (T + S) N H), linear in S for a fixed
block. Exact: every query row is computed exactly as in the reference path.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from . import _spec
from .masks import causal_mask, combine_masks

BLOCK_ROWS = 256  # query rows per block: [B, N, 256, S] logits at a time


def blockwise_attention(q, k, v, rel_k=None, rel_v=None, *, rel_ids=None, mask=None, is_causal=False,
                        scale=None, dropout_p=0.0, max_distance=None, q_offset=None, block: int | None = None):
    """``relative_attention`` computed ``block`` query rows at a time; same arguments and result.

    Args:
        q: [B, T, N, H]; k, v: [B, S, N, H]; rel_k, rel_v, rel_ids, mask, is_causal, scale,
            dropout_p, max_distance: as in ``relative_attention``.
        q_offset: with ``max_distance``, the resolved offset of query 0 (``relative_attention``
            passes S - T when the caller gave none).
        block: query rows per block; default ``BLOCK_ROWS``.

    Returns:
        [B, T, N, H].
    """
    T, S = q.shape[1], k.shape[1]
    block = BLOCK_ROWS if block is None else block
    outs = []
    for i0 in range(0, T, block):
        i1 = min(T, i0 + block)
        args = _block_args(q, rel_k, rel_v, rel_ids, mask, is_causal, max_distance, q_offset, i0, i1, T, S)
        run = _run_block if torch.is_grad_enabled() else _run_block_nograd
        outs.append(run(q[:, i0:i1], k, v, *args, scale, dropout_p))
    return torch.cat(outs, dim=1)


def _block_args(q, rel_k, rel_v, rel_ids, mask, is_causal, max_distance, q_offset, i0, i1, T, S):
    """rel_k, rel_v, rel_ids, mask, causal offset, max_distance, q_offset for query rows [i0, i1)."""
    d = _spec.Dims(B=q.shape[0], T=T, S=S, N=q.shape[2], H=q.shape[3])
    if rel_ids is not None:
        rel_ids = rel_ids[..., i0:i1, :]
    elif max_distance is None:  # dense edges: slice their T dim unless it broadcasts
        rel_k, rel_v = (_edge_rows(name, e, d, i0, i1) for name, e in (("rel_k", rel_k), ("rel_v", rel_v)))
    if mask is not None and mask.dim() >= 2 and mask.shape[-2] == T:
        mask = mask[..., i0:i1, :]
    causal_offset = S - T + i0 if is_causal else None  # rows i0.. of the bottom-right causal mask
    offset = None if max_distance is None else q_offset + i0
    return rel_k, rel_v, rel_ids, mask, causal_offset, max_distance, offset


def _edge_rows(name, edges, d, i0, i1):
    if edges is None:
        return None
    axis = _spec.dense_t_axis(edges.dim())
    return edges if edges.shape[axis] == 1 else edges.narrow(axis, i0, i1 - i0)


def _block(q, k, v, rel_k, rel_v, rel_ids, mask, causal_offset, max_distance, q_offset, scale, dropout_p):
    from .attention import relative_attention  # attention.py imports this module

    if causal_offset is not None:  # built here so no [T, S] mask is kept for the backward
        mask = combine_masks(mask, causal_mask(q.shape[1], k.shape[1], q_offset=causal_offset, device=q.device))
    return relative_attention(q, k, v, rel_k, rel_v, rel_ids=rel_ids, mask=mask, scale=scale, dropout_p=dropout_p,
                              max_distance=max_distance, q_offset=q_offset, implementation="reference")


def _run_block(*args):
    return checkpoint(_block, *args, use_reentrant=False)


def _run_block_nograd(*args):
    return _block(*args)
