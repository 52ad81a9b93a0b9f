"""The relation terms of the fused kernels (PyTorch): a scheme in Shaw form and the logit tables.

Twin of ``relattn_jax/_fused_terms.py``; ``fused.py`` calls these around its autograd function, so
autograd differentiates them. Dimension legend as in ``fused.py``: B T S N H R, N_kv key/value heads.

- ``shaw_form``: any bucket scheme as the Shaw clip K = shaw_width with tables table[shaw_rows] of
  2K + 1 rows (exact);
- ``row_terms``: QA = c q . A^K + b [B, N, T, R], gathered by row in the kernel;
- ``column_terms``: KA = c k . A^Q [B, N, S, R] per query head, gathered by column.
"""

from __future__ import annotations

import torch

from . import buckets


def shaw_form(scheme, max_distance, tables, d, q_offset):
    """The Shaw clip K and the tables in Shaw form, float32: as given for ``max_distance``
    (K = max_distance), else K = shaw_width (the saturation with a tensor q_offset) and each
    table[shaw_rows(scheme, K)] (``_Rows``: its gradient sums back without atomics). A ShawBuckets
    scheme whose clip is lossless for the sizes keeps its tables as they are, like max_distance."""
    tables = {name: None if t is None else t.float() for name, t in tables.items()}
    if scheme is None:
        return max_distance, tables
    K = buckets.shaw_width(scheme, d.T, d.S, q_offset)
    if isinstance(scheme, buckets.ShawBuckets) and K == scheme.max_distance:
        return K, tables
    rows = buckets.shaw_rows(scheme, K, device=next((t.device for t in tables.values() if t is not None), None))
    return K, {name: None if t is None else _Rows.apply(t, rows) for name, t in tables.items()}


class _Rows(torch.autograd.Function):
    """table[rows] along dim 0, with a deterministic backward (one-hot GEMM instead of index_add)."""

    @staticmethod
    def forward(ctx, table, rows):
        ctx.save_for_backward(rows)
        ctx.num_rows = table.shape[0]
        return table.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        one_hot = (rows[:, None] == torch.arange(ctx.num_rows, device=rows.device)).to(grad.dtype)  # [2K+1, R]
        return (one_hot.t() @ grad.reshape(grad.shape[0], -1)).reshape(ctx.num_rows, *grad.shape[1:]), None


def row_terms(q, rel_k, rel_bias, scale):
    """QA = c q . A^K + b as float32 [B, N, T, R], or None without both (autograd differentiates it)."""
    if rel_k is None and rel_bias is None:
        return None
    B, T, N, _ = q.shape
    qa = None if rel_k is None else scale * _table_product(q, rel_k)  # [B, N, T, R]
    if rel_bias is not None:
        b = rel_bias.t()[None, :, None, :]  # b [R, N] -> [1, N, 1, R]
        qa = b.expand(B, N, T, rel_bias.shape[0]) if qa is None else qa + b
    return qa.contiguous()


def column_terms(k, rel_q, scale, N):
    """KA = c k . A^Q per query head as float32 [B, N, S, R], or None; query head n takes kv head n // G."""
    if rel_q is None:
        return None
    B, S, N_kv, H = k.shape
    R, G = rel_q.shape[0], N // N_kv if N_kv else 1
    if rel_q.dim() == 2:  # the same product for the G heads of a group
        ka = torch.einsum("BSKH,RH->BKSR", k.float(), rel_q)[:, :, None].expand(B, N_kv, G, S, R)
    else:  # [R, N_kv, G, H]: head n = (n // G, n % G)
        ka = torch.einsum("BSKH,RKGH->BKGSR", k.float(), rel_q.reshape(R, N_kv, G, H))
    return (scale * ka.reshape(B, N, S, R)).contiguous()


def _table_product(x, table) -> torch.Tensor:
    """x . table_r in float32: [B, T, N, H] with [R, H] or [R, N, H] -> [B, N, T, R]."""
    return torch.einsum(f"BTNH,{layout(table)}->BNTR", x.float(), table.float()).contiguous()


def layout(table) -> str:
    return "RH" if table.dim() == 2 else "RNH"
