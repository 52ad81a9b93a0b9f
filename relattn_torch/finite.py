"""Masked entries have no say: non-finite keys, values, edges or table rows that a query does not attend (PyTorch).

Dimension legend as in ``attention.py``: B T S N H R.

Every path multiplies probabilities by values (and, in the backward, logit gradients by keys,
edges and table rows), and 0 * NaN is NaN: a NaN in a masked key would spread to every query
row, as it does in torch's own scaled_dot_product_attention. So ``relative_attention`` runs its
path on finite stand-ins (``_stand_ins``: every non-finite element of k, v, rel_k, rel_v
replaced by 0, which a masked entry multiplies by an exact 0) and then sets to NaN each query
row that does attend an entry holding a non-finite value (``poison_rows``), as the equations
give it. A masked entry thus changes no output and no gradient, whatever it holds; finite
inputs pass through unchanged, bit for bit. Non-finite queries are left alone: a query's own
NaN is its row's NaN, and a row that sees no key is 0 whatever its query holds.

Cost: on CPU tensors outside ``torch.compile`` one finiteness reduction over the inputs, and
nothing else when they are finite. Elsewhere (no host sync is wanted on an accelerator) the
stand-ins are always made and the rows are found in chunks of query rows, a few boolean passes
over [B, N, T, S] without holding it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .einsum import AttentionArgs
from .masks import causal_mask, combine_masks
from .positions import relative_position_ids

_POISON_CHUNK = 1 << 22  # about B * N * rows * S booleans per chunk of ``poison_rows``


def run_finite(run, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs) -> torch.Tensor:
    """``run(k, v, args)`` (a path's [B, T, N, H] output) with masked non-finite entries given no say.

    Runs ``run`` on the inputs themselves when they are known to be finite, else on their finite
    stand-ins (``_stand_ins``) followed by ``poison_rows``.
    """
    if _known_finite(k, v, args):
        return run(k, v, args)
    return poison_rows(run(*_stand_ins(k, v, args)), k, v, args)


def _known_finite(k, v, args: AttentionArgs) -> bool:
    """True when the inputs are CPU tensors outside ``torch.compile`` and finite (checked now); False otherwise."""
    if k.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return all(t is None or _all_finite(t) for t in (k, v, args.rel_k, args.rel_v, args.rel_q, args.rel_bias))


def _stand_ins(k, v, args: AttentionArgs):
    """(k, v, args) with every non-finite element of k, v and the tables replaced by 0."""
    k, v, rel_k, rel_v, rel_q, rel_bias = (None if t is None else torch.where(torch.isfinite(t), t, 0)
                                           for t in (k, v, args.rel_k, args.rel_v, args.rel_q, args.rel_bias))
    return k, v, replace(args, rel_k=rel_k, rel_v=rel_v, rel_q=rel_q, rel_bias=rel_bias)


def _all_finite(t: torch.Tensor) -> bool:
    """Whether no element of t is NaN or +-inf, in one reduction pass (no boolean temporaries).

    A sum is finite exactly when no element is NaN or +-inf, unless finite elements overflow it;
    that rare false alarm only sends the call through the stand-ins, which then change nothing.
    Half inputs are summed in float32 (a float16 sum overflows at 65504).
    """
    return bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)))


def poison_rows(out: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs) -> torch.Tensor:
    """out [B, T, N, H] with NaN in every query row (per head) that attends a non-finite entry.

    ``k``, ``v`` and ``args`` are the original inputs (before ``_stand_ins``). An entry (i, j)
    holds a non-finite value when k_j, v_j, the dense edges a_ij or the table rows of r_ij do.
    """
    B, T, N, _ = out.shape
    S = k.shape[1]
    bad_key = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # [B, S, N_kv]
    bad_key = bad_key.permute(0, 2, 1).repeat_interleave(N // max(1, k.shape[2]), 1)[:, :, None, :]  # [B, N, 1, S]
    rows = max(1, min(T, _POISON_CHUNK // max(1, B * N * S)))
    poisoned = []
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        bad = bad_key | _bad_relations(args, t0, t1, T, S, N, k.device)  # broadcasts to [B, N, rows, S]
        causal = causal_mask(t1 - t0, S, q_offset=S - T + t0, device=k.device) if args.is_causal else None
        visible = combine_masks(_mask_rows(args.mask, t0, t1, T), causal)
        seen = bad if visible is None else bad & visible
        poisoned.append(seen.any(-1).expand(B, N, t1 - t0))  # [B, N, rows]
    rows_bad = torch.cat(poisoned, dim=-1).permute(0, 2, 1)[..., None]  # [B, T, N, 1]
    return torch.where(rows_bad, torch.nan, out)


def _mask_rows(mask, t0, t1, T):
    if mask is None or mask.dim() < 2 or mask.shape[-2] != T or T == 1:
        return mask
    return mask[..., t0:t1, :]


def _bad_relations(args: AttentionArgs, t0, t1, T, S, N, device) -> torch.Tensor:
    """Whether a_ij is non-finite for query rows [t0, t1), broadcastable to [B, N, rows, S]."""
    bad = torch.zeros((), dtype=torch.bool, device=device)
    if args.max_distance is None and args.rel_ids is None and args.scheme is None:  # dense edges (or none)
        for edges in (args.rel_k, args.rel_v):
            if edges is not None:
                bad = bad | _edge_rows(~torch.isfinite(edges).all(-1), t0, t1, T)
        return bad
    if args.max_distance is not None:
        ids = relative_position_ids(t1 - t0, S, args.max_distance, q_offset=args.q_offset + t0, device=device)
    elif args.scheme is not None:
        ids = args.scheme.ids(t1 - t0, S, args.q_offset + t0, device=device)
    else:
        ids = args.rel_ids[..., t0:t1, :]
    ids = ids.long().unsqueeze(-3)  # [1, rows, S] or [B, 1, rows, S]
    for table in (args.rel_k, args.rel_v, args.rel_q, args.rel_bias):
        if table is not None:
            finite = torch.isfinite(table) if table is args.rel_bias else torch.isfinite(table).all(-1)
            bad_row = ~finite  # [R] or [R, N]
            bad_row = bad_row[None] if bad_row.dim() == 1 else bad_row.T  # [1 or N, R]
            bad = bad | _take_bad(bad_row, ids)
    return bad


def _take_bad(bad_row, ids):
    """bad_row [1 or N, R] at ids [1, rows, S] or [B, 1, rows, S] -> [.., 1 or N, rows, S]."""
    index = ids.clamp(0, bad_row.shape[1] - 1)
    flat = bad_row[:, index.reshape(-1)]  # [1 or N, numel]
    out = flat.reshape(bad_row.shape[0], *index.shape)  # [1 or N, (B,) 1, rows, S]
    out = out.squeeze(-3)  # [1 or N, (B,) rows, S]
    return out if index.dim() == 3 else out.movedim(0, 1)  # [1 or N, rows, S] or [B, 1 or N, rows, S]


def _edge_rows(bad, t0, t1, T):
    """Non-finite flags of dense edges ([T, S], [T, S, N] or [B, T, S, N]; size-1 T, S) for rows [t0, t1)
    as [T', S], [N, T', S] or [B, N, T', S]."""
    if bad.dim() >= 3:
        bad = bad.movedim(-1, -3)  # N before T, S
    if bad.shape[-2] == T and T != 1:
        bad = bad[..., t0:t1, :]
    return bad
