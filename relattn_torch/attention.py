"""Relative-position attention as pure functions on tensors (PyTorch).

Dimension legend (shared with ``relattn_jax/attention.py``):
    B batch, T query length, S key length, N heads, H head dim,
    R relation ids, E model width, I input features per head.

Grouped key/value heads: k, v may hold N_kv heads, N % N_kv == 0, and query head n reads
key/value head n // G, G = N / N_kv (the einsums write them K and G).

Equations (Shaw et al. 2018, relation-aware self-attention; the query-side term and the
bias table of T5 / DeBERTa / BERT relative_key_query, with r_ij the relation id of the pair;
ALiBi's slopes m_n, with the same q_offset):
    e_ij = (q_i . (k_j + a^K_ij) + k_j . a^Q[r_ij]) * scale + b[r_ij, n] - m_n |j - i - q_offset|
    alpha_i = softmax_j(e_ij) over the keys visible to query i
    z_i = sum_j alpha_ij (v_j + a^V_ij)
"""

from __future__ import annotations

import torch

from . import _scheme_spec, _spec
from .blockwise import blockwise_attention
from .buckets import ShawBuckets, _Scheme
from .choice import IMPLEMENTATIONS, LONG_SEQUENCE_THRESHOLD, choose_implementation
from .einsum import AttentionArgs, einsum_attention, masked_softmax
from .finite import run_finite
from .fused import fused_attention
from .shaw import shaw_attention

__all__ = ["IMPLEMENTATIONS", "LONG_SEQUENCE_THRESHOLD", "masked_softmax", "relative_attention"]


def relative_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_k: torch.Tensor | None = None,
    rel_v: torch.Tensor | None = None,
    *,
    rel_ids: torch.Tensor | None = None,
    rel_q: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scheme: _Scheme | None = None,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    max_distance: int | None = None,
    q_offset: int | torch.Tensor | None = None,
    check_ids: bool = False,
    implementation: str | None = None,
) -> torch.Tensor:
    """Multi-head attention with relative key and value terms.

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, N, H], or [B, S, N_kv, H] with N % N_kv == 0 (grouped key/value heads:
            query head n reads key/value head n // (N // N_kv), HF ``repeat_kv``'s order).
        v: values, the shape of k.
        rel_k: key-side relation term a^K, or None. Dense form (``rel_ids is None``):
            edge tensor [T, S, H] (shared by heads), [T, S, N, H] or [B, T, S, N, H]
            (size-1 B, T, S, N broadcast). Table form: [R, H] or [R, N, H].
        rel_v: value-side relation term a^V, same forms as ``rel_k``, or None.
        rel_ids: int relation ids [T, S] or [B, T, S] with values in [0, R); selects
            the table form, where a_ij = table[rel_ids[i, j]]. Checked on every eager
            call; under ``torch.compile`` see ``check_ids``.
        rel_q: query-side relation table a^Q [R, H] or [R, N, H], or None: adds
            scale * k_j . a^Q[r_ij] to the logits (BERT ``relative_key_query``'s key term,
            DeBERTa's position-to-content term). Needs ids: ``rel_ids``, ``max_distance`` or
            ``scheme``.
        rel_bias: per-head scalar bias table b [R, N], or None: adds b[r_ij, n] to the logits
            after the scale (T5's ``relative_attention_bias``; T5 passes scale=1.0). Needs ids.
        alibi_slopes: ALiBi slopes m [N] (one per query head, finite, the dtype of q), or None:
            adds -m_n * |j - i - q_offset| to the logits after the scale, beside ``rel_bias``;
            needs no ids. Only the "einsum" and "blockwise" paths take it.
        scheme: a bucket scheme from ``buckets.py`` (``ShawBuckets``, ``T5Buckets``,
            ``DebertaBuckets``, ``BertBuckets``), or None: the ids are
            ``scheme.ids(T, S, q_offset)`` and every table given (rel_k, rel_v, rel_q,
            rel_bias) has ``scheme.num_ids`` rows. Excludes ``rel_ids`` and ``max_distance``;
            ``scheme=ShawBuckets(K)`` is exactly ``max_distance=K``.
        mask: bool, broadcastable to [B, N, T, S]; True means the query may attend the key.
            A masked entry changes no output and no gradient, whatever k, v, the edges or
            the table rows hold there (NaN and inf included); a query row that attends a
            non-finite entry is NaN.
        is_causal: key j is visible to query i iff j <= i + (S - T) (bottom-right
            aligned, so it stays right when the keys include a cache). Combines with mask.
        scale: logit scale, a finite real number (0 gives uniform weights); default
            1 / sqrt(H).
        dropout_p: dropout probability in [0, 1) on the attention weights (0 disables it;
            modules pass 0 in eval mode).
        max_distance: the Shaw form without an id tensor: rel_k / rel_v are tables
            [R, H] or [R, N, H] with R = 2 * max_distance + 1 and the ids are
            clip(j - i - q_offset, -max_distance, max_distance) + max_distance, as
            ``relative_position_ids`` makes them. Excludes ``rel_ids``.
        q_offset: position of query 0 among the keys for those ids and ALiBi's distances (int
            or 0-d int tensor); default S - T. Only with ``max_distance``, ``scheme`` or
            ``alibi_slopes``.
        check_ids: under ``torch.compile`` the rel_ids values are not known when the
            graph is traced. False (default): ids outside [0, R) are clamped to the
            nearest row, with no check. True: an out-of-range id stops the call with a
            RuntimeError naming rel_ids (``torch._assert_async``; on CUDA a device-side
            assert). Eager calls always raise ValueError for such ids.
        implementation: None or "auto" lets ``choose_implementation`` pick the path
            from its rule table; a name forces one path: "fused" (``fused.py``: the
            Triton kernel; ``max_distance`` or ``scheme``, no alibi_slopes, no dropout,
            float32/float16/bfloat16, CUDA tensors, or CPU tensors with TRITON_INTERPRET=1),
            "einsum" (``einsum.py``: the equations over [B, N, T, S] logits), "shaw"
            (``shaw.py``: the banded Shaw path; CPU float32/float64, ``max_distance`` or
            ``scheme`` with rel_k / rel_v only, no mask or a key-padding mask, no dropout, an
            int q_offset) or "blockwise" (``blockwise.py``: query blocks, memory linear in S).
            "reference" is a deprecated alias of "einsum". The table is on the
            Implementations page of the docs.

    Returns:
        [B, T, N, H], dtype of q. A query that sees no key returns exactly 0; so does
        every query when S = 0. Any size may be 0.

    Raises:
        TypeError / ValueError: naming the argument, for a wrong type, shape, dtype or value.
    """
    _check_types(q=q, k=k, v=v, rel_k=rel_k, rel_v=rel_v, rel_ids=rel_ids, rel_q=rel_q, rel_bias=rel_bias,
                 alibi_slopes=alibi_slopes, mask=mask)
    given = scheme
    scheme, max_distance = _resolve_scheme(scheme, rel_ids, max_distance)
    tables = dict(rel_k=rel_k, rel_v=rel_v, rel_q=rel_q, rel_bias=rel_bias)
    d = _check(q, k, v, rel_k, rel_v, rel_ids, mask, shaw=max_distance is not None or scheme is not None,
               rel_q=rel_q, rel_bias=rel_bias, alibi_slopes=alibi_slopes)
    if given is not None:
        _scheme_spec.check_scheme_tables(repr(given), given.num_ids, [(n, _shape(t)) for n, t in tables.items()], d)
    _spec.check_shaw(_shape(rel_k), _shape(rel_v), rel_ids is not None, max_distance, q_offset is not None, d,
                     _shape(rel_q), _shape(rel_bias), positional=scheme is not None or alibi_slopes is not None)
    _check_scalars(is_causal, scale, dropout_p, q_offset, check_ids)
    if q_offset is None and (max_distance is not None or scheme is not None or alibi_slopes is not None):
        q_offset = d.S - d.T  # the queries are the last T key positions
    if rel_ids is not None and torch.compiler.is_compiling():
        rel_ids = _traced_ids(rel_ids, [t.shape[0] for t in tables.values() if t is not None], check_ids)
    args = AttentionArgs(rel_k=rel_k, rel_v=rel_v, rel_ids=rel_ids, mask=mask, is_causal=is_causal,
                         scale=_spec.default_scale(d.H) if scale is None else float(scale), dropout_p=float(dropout_p),
                         max_distance=max_distance, q_offset=q_offset, rel_q=rel_q, rel_bias=rel_bias, scheme=scheme,
                         alibi_slopes=alibi_slopes)
    name = choose_implementation(q, k, v, args, implementation).name
    return run_finite(lambda k_, v_, args_: _run(name, q, k_, v_, args_), k, v, args)


def _run(name: str, q, k, v, args: AttentionArgs) -> torch.Tensor:
    """The chosen path's pure function (looked up at call time, so tests can spy on it)."""
    if name == "fused":
        return fused_attention(q, k, v, args.rel_k, args.rel_v, rel_q=args.rel_q, rel_bias=args.rel_bias,
                               scheme=args.scheme, max_distance=args.max_distance, q_offset=args.q_offset,
                               is_causal=args.is_causal, scale=args.scale, mask=args.mask)
    if name == "shaw":
        return shaw_attention(q, k, v, args)
    if name == "blockwise":
        return blockwise_attention(q, k, v, args)
    return einsum_attention(q, k, v, args)


def _shape(x):
    return None if x is None else tuple(x.shape)


def _resolve_scheme(scheme, rel_ids, max_distance):
    """(scheme, max_distance) with ShawBuckets(K) as max_distance=K, so that every Shaw path takes it."""
    if scheme is None:
        return None, max_distance
    if not isinstance(scheme, _Scheme):
        raise TypeError("scheme must be None, ShawBuckets, T5Buckets, DebertaBuckets or BertBuckets, "
                        f"got {type(scheme).__module__}.{type(scheme).__name__}")
    _scheme_spec.check_scheme_args(rel_ids is not None, max_distance)
    if isinstance(scheme, ShawBuckets):
        return None, scheme.max_distance
    return scheme, None


def _check_types(required=("q", "k", "v"), **named) -> None:
    """Every given argument is a torch.Tensor, else a TypeError naming it (the layers use it too)."""
    for name, x in named.items():
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor{'' if name in required else ' or None'}, "
                            f"got {type(x).__module__}.{type(x).__name__}")


def _check_scalars(is_causal, scale, dropout_p, q_offset, check_ids) -> None:
    _spec.check_bool("is_causal", is_causal)
    _spec.check_bool("check_ids", check_ids)
    _spec.check_scale(scale)
    _spec.check_dropout_p(dropout_p)
    if isinstance(q_offset, torch.Tensor):
        dtype = q_offset.dtype
        _spec.check_offset_array(not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool),
                                 q_offset.dim(), dtype)
    elif q_offset is not None:
        _spec.check_int_offset(q_offset)


def _traced_ids(rel_ids: torch.Tensor, rows: list[int], check_ids: bool) -> torch.Tensor:
    """rel_ids under torch.compile: asserted in range (check_ids) or clamped into [0, R)."""
    R = min(rows)
    if check_ids:
        torch._assert_async(((rel_ids >= 0) & (rel_ids < R)).all(), _spec.rel_ids_range_message("every table", R))
        return rel_ids
    return rel_ids.clamp(0, R - 1)


def _check(q, k, v, rel_k, rel_v, rel_ids, mask, shaw=False, rel_q=None, rel_bias=None,
           alibi_slopes=None) -> _spec.Dims:
    """Shapes, dtypes and id values; ``shaw``: the ids are implied (max_distance or a scheme)."""
    d = _spec.check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    named = [("q", q.dtype), ("k", k.dtype), ("v", v.dtype)]
    terms = (("rel_k", rel_k), ("rel_v", rel_v), ("rel_q", rel_q), ("rel_bias", rel_bias),
             ("alibi_slopes", alibi_slopes))
    named += [(n, t.dtype) for n, t in terms if t is not None]
    _spec.check_float_dtypes(named, lambda dt: dt.is_floating_point)
    tables_given = terms[:4]  # the tables, without the slopes
    if alibi_slopes is not None:
        finite = None if torch.compiler.is_compiling() else bool(torch.isfinite(alibi_slopes).all())
        _scheme_spec.check_alibi(tuple(alibi_slopes.shape), finite, d)
    _spec.check_rel_args(rel_k, rel_v, rel_ids, rel_q, rel_bias)
    _spec.check_query_terms(_shape(rel_q), _shape(rel_bias), rel_ids is not None or shaw, d)
    if rel_ids is not None:
        if rel_ids.dtype.is_floating_point or rel_ids.dtype.is_complex or rel_ids.dtype == torch.bool:
            raise TypeError(f"rel_ids must be an integer tensor, got dtype {rel_ids.dtype}")
        _spec.check_rel_ids_shape(tuple(rel_ids.shape), d)
        tables = [(n, t) for n, t in tables_given if t is not None]
        for name, table in [(n, t) for n, t in tables if n in ("rel_k", "rel_v")]:
            _spec.table_layout(name, tuple(table.shape), d)
        if not torch.compiler.is_compiling() and rel_ids.numel():
            lo, hi = int(rel_ids.min()), int(rel_ids.max())
            _spec.check_rel_ids_range(lo, hi, [(n, t.shape[0]) for n, t in tables])
    elif not shaw:  # the Shaw / scheme tables are checked by _spec.check_shaw / check_scheme_tables
        for name, edges in (("rel_k", rel_k), ("rel_v", rel_v)):
            if edges is not None:
                _spec.dense_edge_layout(name, tuple(edges.shape), d)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
        _spec.check_mask_shape(tuple(mask.shape), d)
    return d
