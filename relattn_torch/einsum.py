"""The einsum path: the equations written out over [B, N, T, S] logits (PyTorch).

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

import torch

from . import _spec
from .dense import edge_key_term, edge_value_term
from .masks import causal_mask, combine_masks
from .buckets import _Scheme, relative_positions
from .positions import relative_position_ids

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionArgs:
    """The arguments of one ``relative_attention`` call besides q, k, v, checked and resolved.

    ``relative_attention`` builds it once per call and hands it to the path it chose; the
    fields mean what the arguments of ``relative_attention`` mean, with ``scale`` resolved to
    a number and, in the Shaw form, ``q_offset`` resolved to S - T when none was given.
    The JAX twin adds ``dropout_rng`` (torch draws from its global generator).
    """

    rel_k: torch.Tensor | None = None
    rel_v: torch.Tensor | None = None
    rel_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    is_causal: bool = False
    scale: float = 1.0
    dropout_p: float = 0.0
    max_distance: int | None = None
    q_offset: int | torch.Tensor | None = None
    rel_q: torch.Tensor | None = None
    rel_bias: torch.Tensor | None = None
    scheme: _Scheme | None = None  # a bucket scheme other than ShawBuckets (that one is max_distance)
    alibi_slopes: torch.Tensor | None = None


def einsum_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs) -> torch.Tensor:
    """Relative attention by einsums over the full [B, N, T, S] logits; no input checks.

    Table and Shaw ids gather ``q . table`` and scatter the probabilities into table buckets
    ([B, N, T, R] products, never a [B, N, T, S, H] tensor); dense edges with a head axis go
    through ``dense.py``'s in-place GEMMs; grouped k, v are read in place by grouped einsums.

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, N_kv, H] (N_kv divides N).
        v: values [B, S, N_kv, H].
        args: the checked arguments of the call (``relative_attention`` makes them).

    Returns:
        [B, T, N, H], dtype of q. A query that sees no key returns exactly 0.
    """
    d = _spec.Dims(B=q.shape[0], T=q.shape[1], S=k.shape[1], N=q.shape[2], H=q.shape[3], N_kv=k.shape[2])
    rel_ids = _ids(args, d, q.device)

    # half inputs: the logits and the softmax in float32 (rounding the logits to bf16 first
    # errs by 1e-1 where q . k ~ 1e3, and fp16 overflows); the value products in the inputs' dtype
    acc = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    logits = _scores(q.to(acc), k.to(acc), d)  # [B, N, T, S]
    if args.rel_k is not None:
        logits = logits + _key_term(q.to(acc), args.rel_k.to(acc), rel_ids, d)
    if args.rel_q is not None:
        logits = logits + _query_term(k.to(acc), args.rel_q.to(acc), rel_ids, d)
    visible = combine_masks(args.mask, causal_mask(d.T, d.S, device=q.device) if args.is_causal else None)
    after = _after_scale(args, rel_ids, d, acc, q.device)
    if after is None:
        probs = masked_softmax(logits, visible, args.scale)  # [B, N, T, S]
    else:  # the bias and ALiBi come after the scale (T5 passes scale=1.0)
        probs = masked_softmax(logits * args.scale + after, visible, 1.0)
    if args.dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=args.dropout_p, training=True)
    probs = probs.to(q.dtype)

    out = _mix(probs, v, d)
    if args.rel_v is not None:
        out = out + _value_term(probs, args.rel_v, rel_ids, d)
    return out


def _ids(args: AttentionArgs, d, device) -> torch.Tensor | None:
    """The relation ids [T, S] or [B, T, S] of the call: given, Shaw's or the scheme's (None: dense edges)."""
    if args.max_distance is not None:
        return relative_position_ids(d.T, d.S, args.max_distance, q_offset=args.q_offset, device=device)
    if args.scheme is not None:
        return args.scheme.ids(d.T, d.S, args.q_offset, device=device)
    return args.rel_ids


def _scores(q, k, d) -> torch.Tensor:
    """q_i . k_j as [B, N, T, S]; grouped k [B, S, K, H] read in place."""
    if d.groups == 1:
        return torch.einsum("BTNH,BSNH->BNTS", q, k)
    qg = q.reshape(d.B, d.T, d.kv_heads, d.groups, d.H)
    return torch.einsum("BTKGH,BSKH->BKGTS", qg, k).reshape(d.B, d.N, d.T, d.S)


def _mix(probs, v, d) -> torch.Tensor:
    """sum_j alpha_ij v_j as [B, T, N, H]; grouped v [B, S, K, H] read in place."""
    if d.groups == 1:
        return torch.einsum("BNTS,BSNH->BTNH", probs, v)
    pg = probs.reshape(d.B, d.kv_heads, d.groups, d.T, d.S)
    return torch.einsum("BKGTS,BSKH->BTKGH", pg, v).reshape(d.B, d.T, d.N, d.H)


def _after_scale(args: AttentionArgs, rel_ids, d, acc, device) -> torch.Tensor | None:
    """b[r_ij, n] - m_n |j - i - q_offset|, broadcastable to [B, N, T, S], or None without either term."""
    out = None
    if args.rel_bias is not None:
        out = _bias_term(args.rel_bias.to(acc), rel_ids, d)
    if args.alibi_slopes is not None:
        distance = relative_positions(d.T, d.S, args.q_offset, device=device).abs().to(acc)  # [T, S]
        alibi = -args.alibi_slopes.to(acc)[:, None, None] * distance  # [N, T, S]
        out = alibi if out is None else out + alibi
    return out


def masked_softmax(logits: torch.Tensor, visible: torch.Tensor | None, scale: float) -> torch.Tensor:
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
    x = logits.float() if logits.dtype in _LOW_PRECISION else logits
    x = x * scale
    if visible is not None:
        x = torch.where(visible, x, torch.finfo(x.dtype).min)
    probs = torch.softmax(x, dim=-1)
    if visible is not None:
        probs = torch.where(visible, probs, 0.0)
    return probs.to(logits.dtype)


def _key_term(q, rel_k, rel_ids, d) -> torch.Tensor:
    """q_i . a^K_ij as [B, N, T, S]."""
    if rel_ids is None:
        letters, edges = _edges("rel_k", rel_k, d)
        return edge_key_term(q, edges, letters)
    layout = _spec.table_layout("rel_k", tuple(rel_k.shape), d)
    q_rel = torch.einsum(f"BTNH,{layout}->BNTR", q, rel_k)  # [B, N, T, R]
    return torch.gather(q_rel, -1, _index(rel_ids, d))


def _query_term(k, rel_q, rel_ids, d) -> torch.Tensor:
    """k_j . a^Q[r_ij] as [B, N, T, S]: k . table per key and id ([B, N, R, S]), gathered along R at each (i, j)."""
    layout = _spec.table_layout("rel_q", tuple(rel_q.shape), d)
    if d.groups == 1:
        k_rel = torch.einsum(f"BSNH,{layout}->BNRS", k, rel_q)  # [B, N, R, S]
    elif layout == "RH":  # one table for every head: [B, K, R, S], the same for the G heads of a group
        k_rel = torch.einsum("BSKH,RH->BKRS", k, rel_q)[:, :, None]
        k_rel = k_rel.expand(d.B, d.kv_heads, d.groups, *k_rel.shape[-2:]).reshape(d.B, d.N, -1, d.S)
    else:
        rq = rel_q.reshape(rel_q.shape[0], d.kv_heads, d.groups, d.H)
        k_rel = torch.einsum("BSKH,RKGH->BKGRS", k, rq).reshape(d.B, d.N, -1, d.S)
    return torch.gather(k_rel, -2, _index(rel_ids, d))


def _bias_term(rel_bias, rel_ids, d) -> torch.Tensor:
    """b[r_ij, n] as [N, T, S] or [B, N, T, S]."""
    taken = rel_bias.T[:, rel_ids.long()]  # [N, T, S] or [N, B, T, S]
    return taken if rel_ids.dim() == 2 else taken.movedim(0, 1)


def _value_term(probs, rel_v, rel_ids, d) -> torch.Tensor:
    """sum_j alpha_ij a^V_ij as [B, T, N, H]."""
    if rel_ids is None:
        letters, edges = _edges("rel_v", rel_v, d)
        return edge_value_term(probs, edges, letters)
    layout = _spec.table_layout("rel_v", tuple(rel_v.shape), d)
    buckets = probs.new_zeros(d.B, d.N, d.T, rel_v.shape[0])  # [B, N, T, R]
    buckets = buckets.scatter_add(-1, _index(rel_ids, d), probs)
    return torch.einsum(f"BNTR,{layout}->BTNH", buckets, rel_v)


def _edges(name, edges, d):
    """A dense edge tensor and its einsum letters; size-1 T/S dims expand as a view."""
    letters, squeezed, target = _spec.dense_edge_layout(name, tuple(edges.shape), d)
    return letters, edges.reshape(squeezed).expand(target)


def _index(rel_ids, d) -> torch.Tensor:
    """rel_ids [T, S] or [B, T, S] as a gather index [B, N, T, S] (a view)."""
    ids = rel_ids.long()
    ids = ids.reshape(1, 1, d.T, d.S) if ids.dim() == 2 else ids.reshape(ids.shape[0], 1, d.T, d.S)
    return ids.expand(d.B, d.N, d.T, d.S)
