"""Relative-position attention as pure functions on tensors (PyTorch).

Dimension legend (shared with ``relattn_jax/attention.py``):
    B batch, T query length, S key length, N heads, H head dim,
    R relation ids, E model width, I input features per head.

Equations (Shaw et al. 2018, relation-aware self-attention):
    e_ij = q_i . (k_j + a^K_ij) * scale
    alpha_i = softmax_j(e_ij) over the keys visible to query i
    z_i = sum_j alpha_ij (v_j + a^V_ij)
"""

from __future__ import annotations

import torch

from . import _spec
from .blockwise import blockwise_attention
from .dense import edge_key_term, edge_value_term
from .masks import causal_mask, combine_masks
from .positions import relative_position_ids
from .shaw import shaw_attention, supports as shaw_supports

_LOW_PRECISION = (torch.float16, torch.bfloat16)
IMPLEMENTATIONS = ("auto", "reference", "shaw", "blockwise")
# "auto" switches to the linear-memory blockwise path once B * N * T * S reaches this
# (2**27 float32 logits = 512 MiB per [B, N, T, S] tensor).
LONG_SEQUENCE_THRESHOLD = 2**27


def relative_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_k: torch.Tensor | None = None,
    rel_v: torch.Tensor | None = None,
    *,
    rel_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    max_distance: int | None = None,
    q_offset: int | torch.Tensor | None = None,
    implementation: str | None = None,
) -> torch.Tensor:
    """Multi-head attention with relative key and value terms.

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, N, H].
        v: values [B, S, N, H].
        rel_k: key-side relation term a^K, or None. Dense form (``rel_ids is None``):
            edge tensor [T, S, H] (shared by heads), [T, S, N, H] or [B, T, S, N, H]
            (size-1 B, T, S, N broadcast). Table form: [R, H] or [R, N, H].
        rel_v: value-side relation term a^V, same forms as ``rel_k``, or None.
        rel_ids: int relation ids [T, S] or [B, T, S] with values in [0, R); selects
            the table form, where a_ij = table[rel_ids[i, j]].
        mask: bool, broadcastable to [B, N, T, S]; True means the query may attend the key.
        is_causal: key j is visible to query i iff j <= i + (S - T) (bottom-right
            aligned, so it stays right when the keys include a cache). Combines with mask.
        scale: logit scale; default 1 / sqrt(H).
        dropout_p: dropout probability on the attention weights (0 disables it;
            modules pass 0 in eval mode).
        max_distance: the Shaw form without an id tensor: rel_k / rel_v are tables
            [R, H] or [R, N, H] with R = 2 * max_distance + 1 and the ids are
            clip(j - i - q_offset, -max_distance, max_distance) + max_distance, as
            ``relative_position_ids`` makes them. Excludes ``rel_ids``.
        q_offset: position of query 0 among the keys for those ids (int or int
            tensor); default S - T. Only with ``max_distance``.
        implementation: None or "auto" picks the fastest exact path for the inputs;
            "reference" the einsum path written out here; "shaw" the banded Shaw
            path (``shaw.py``: fused attention on the clipped tails, O(T * k) band;
            needs ``max_distance``, no mask, no dropout, an int q_offset);
            "blockwise" the linear-memory query-blocked path (``blockwise.py``),
            which "auto" uses once B * N * T * S reaches ``LONG_SEQUENCE_THRESHOLD``.

    Returns:
        [B, T, N, H], dtype of q. A query that sees no key returns exactly 0.
    """
    d = _check(q, k, v, rel_k, rel_v, rel_ids, mask, shaw=max_distance is not None)
    _spec.check_shaw(_shape(rel_k), _shape(rel_v), rel_ids is not None, max_distance, q_offset is not None, d)
    if max_distance is not None and q_offset is None:
        q_offset = d.S - d.T  # the queries are the last T key positions
    scale = d.H**-0.5 if scale is None else scale
    impl = _choose(implementation, q, rel_ids, mask, is_causal, dropout_p, max_distance, q_offset, d)
    if impl == "shaw":
        return shaw_attention(q, k, v, rel_k, rel_v, max_distance=max_distance, q_offset=q_offset,
                              is_causal=is_causal, scale=scale)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, rel_k, rel_v, rel_ids=rel_ids, mask=mask, is_causal=is_causal,
                                   scale=scale, dropout_p=dropout_p, max_distance=max_distance, q_offset=q_offset)
    if max_distance is not None:
        rel_ids = relative_position_ids(d.T, d.S, max_distance, q_offset=q_offset, device=q.device)

    logits = torch.einsum("BTNH,BSNH->BNTS", q, k)  # [B, N, T, S]
    if rel_k is not None:
        logits = logits + _key_term(q, rel_k, rel_ids, d)
    visible = combine_masks(mask, causal_mask(d.T, d.S, device=q.device) if is_causal else None)
    probs = masked_softmax(logits, visible, scale)  # [B, N, T, S]
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)

    out = torch.einsum("BNTS,BSNH->BTNH", probs, v)
    if rel_v is not None:
        out = out + _value_term(probs, rel_v, rel_ids, d)
    return out


def masked_softmax(logits: torch.Tensor, visible: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(logits * scale) over the last axis, in float32 for half inputs.

    Masked entries get the dtype's most negative finite value (no -inf, no -1e20
    overflow in half precision); rows with no visible entry come out as zeros.
    Returns the input dtype.
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


def _shape(x):
    return None if x is None else tuple(x.shape)


def _check(q, k, v, rel_k, rel_v, rel_ids, mask, shaw=False) -> _spec.Dims:
    d = _spec.check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    named = [("q", q.dtype), ("k", k.dtype), ("v", v.dtype)]
    named += [(n, t.dtype) for n, t in (("rel_k", rel_k), ("rel_v", rel_v)) if t is not None]
    _spec.check_float_dtypes(named, lambda dt: dt.is_floating_point)
    _spec.check_rel_args(rel_k, rel_v, rel_ids)
    if rel_ids is not None:
        if rel_ids.dtype.is_floating_point or rel_ids.dtype.is_complex or rel_ids.dtype == torch.bool:
            raise TypeError(f"rel_ids must be an integer tensor, got dtype {rel_ids.dtype}")
        _spec.check_rel_ids_shape(tuple(rel_ids.shape), d)
        tables = [(n, t) for n, t in (("rel_k", rel_k), ("rel_v", rel_v)) if t is not None]
        for name, table in tables:
            _spec.table_layout(name, tuple(table.shape), d)
        if not torch.compiler.is_compiling() and rel_ids.numel():
            lo, hi = int(rel_ids.min()), int(rel_ids.max())
            _spec.check_rel_ids_range(lo, hi, [(n, t.shape[0]) for n, t in tables])
    elif not shaw:  # the Shaw tables are checked by _spec.check_shaw
        for name, edges in (("rel_k", rel_k), ("rel_v", rel_v)):
            if edges is not None:
                _spec.dense_edge_layout(name, tuple(edges.shape), d)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
        _spec.check_mask_shape(tuple(mask.shape), d)
    return d


def _choose(implementation, q, rel_ids, mask, is_causal, dropout_p, max_distance, q_offset, d) -> str:
    """The implementation to run: the named one, or for "auto" the fastest exact one."""
    impl = "auto" if implementation is None else implementation
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    shaw_ok = (
        max_distance is not None and mask is None and dropout_p == 0.0
        and q.dtype in (torch.float32, torch.float64) and q.device.type == "cpu"
        and shaw_supports(d.T, d.S, q_offset, max_distance, is_causal)
    )
    if impl == "shaw" and not shaw_ok:
        raise ValueError(
            "implementation='shaw' needs max_distance, no mask, dropout_p=0, float32/float64 CPU tensors, an int "
            "q_offset and, when causal, q_offset + max(max_distance, 1) > S - T; use 'auto' to fall back"
        )
    if impl != "auto":
        return impl
    if shaw_ok:
        return "shaw"
    return "blockwise" if d.B * d.N * d.T * d.S >= LONG_SEQUENCE_THRESHOLD else "reference"
