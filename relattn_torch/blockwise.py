"""Linear-memory relative attention: query blocks, each recomputed in the backward (PyTorch).

Why this twin differs: here a Python loop runs the blocks (each under
``torch.utils.checkpoint``) and every block takes the einsum path, since this package's Shaw
path takes no mask but a key-padding one and a block's causal rows arrive as one. The JAX twin runs the blocks with
``lax.map`` over zero-padded blocks of equal size (one traced body, so XLA compiles it once)
under ``jax.checkpoint``, and in the Shaw form each block takes its Shaw path.

Dimension legend as in ``attention.py``: B T S N H R.

The queries are cut into blocks of ``BLOCK_ROWS`` rows. Each block runs the einsum path on its
rows (its slice of rel_ids / dense edges / mask, its own causal rows and offset of the Shaw or
scheme ids and ALiBi distances) under
activation checkpointing, so only one block's [B, N, block, S] logits exist at a time, forward
or backward: peak memory is O(B N block S + B (T + S) N H), linear in S for a fixed block.
Exact: every query row is computed exactly as in the einsum path.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.checkpoint import checkpoint

from . import _spec
from .einsum import AttentionArgs, einsum_attention
from .masks import causal_mask, combine_masks

BLOCK_ROWS = 256  # query rows per block: [B, N, 256, S] logits at a time


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs) -> torch.Tensor:
    """The einsum path computed ``BLOCK_ROWS`` query rows at a time, each block recomputed in the backward.

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, N_kv, H] (N_kv divides N; grouped heads are read in place by the einsum path).
        v: values [B, S, N_kv, H].
        args: the checked arguments of the call (``relative_attention`` makes them).

    Returns:
        [B, T, N, H], equal to the einsum path's result.
    """
    T, S = q.shape[1], k.shape[1]
    run = _run_block if torch.is_grad_enabled() else _block
    outs = []
    for i0 in range(0, T, BLOCK_ROWS):
        i1 = min(T, i0 + BLOCK_ROWS)
        block_args, causal_offset = _block_args(args, q.shape, S, i0, i1)
        outs.append(run(q[:, i0:i1], k, v, block_args, causal_offset))
    return torch.cat(outs, dim=1)


def _block_args(args: AttentionArgs, q_shape, S: int, i0: int, i1: int) -> tuple[AttentionArgs, int | None]:
    """The arguments for query rows [i0, i1) and, when causal, the offset of their causal rows."""
    B, T, N, H = q_shape
    rel_k, rel_v, rel_ids, mask = args.rel_k, args.rel_v, args.rel_ids, args.mask
    if rel_ids is not None:
        rel_ids = rel_ids[..., i0:i1, :]
    elif args.max_distance is None and args.scheme is None:  # dense edges: slice their T dim unless it broadcasts
        rel_k, rel_v = _edge_rows(rel_k, i0, i1), _edge_rows(rel_v, i0, i1)
    if mask is not None and mask.dim() >= 2 and mask.shape[-2] == T:
        mask = mask[..., i0:i1, :]
    q_offset = None if args.q_offset is None else args.q_offset + i0  # Shaw / scheme ids, ALiBi distances
    causal_offset = S - T + i0 if args.is_causal else None  # rows i0.. of the bottom-right causal mask
    block_args = replace(args, rel_k=rel_k, rel_v=rel_v, rel_ids=rel_ids, mask=mask, is_causal=False,
                         q_offset=q_offset)
    return block_args, causal_offset


def _edge_rows(edges, i0, i1):
    if edges is None:
        return None
    axis = _spec.dense_t_axis(edges.dim())
    return edges if edges.shape[axis] == 1 else edges.narrow(axis, i0, i1 - i0)


def _block(q, k, v, args: AttentionArgs, causal_offset: int | None) -> torch.Tensor:
    if causal_offset is not None:  # built here so no [T, S] mask is kept for the backward
        causal = causal_mask(q.shape[1], k.shape[1], q_offset=causal_offset, device=q.device)
        args = replace(args, mask=combine_masks(args.mask, causal))
    return einsum_attention(q, k, v, args)


def _run_block(*args):
    return checkpoint(_block, *args, use_reentrant=False)
