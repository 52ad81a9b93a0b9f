"""Parameter-holding attention layers (PyTorch). The math lives in ``attention.py``.

Parameter names and layouts are identical in ``relattn_jax.modules`` (they are the
names in the weight file):

    w_q            [E, N, H]       query projection       b_q            [N, H]
    w_k, w_v       [E, N_kv, H]    key/value projections  b_k, b_v       [N_kv, H]
    w_o            [N, H, E]       output projection      b_o            [E]
    rel_k, rel_v   [R, H] or [R, N, H]   key / value tables a^K, a^V
    rel_kv         [R, H] or [R, N, H]   one table for both (``shared_relative_table``)
    rel_q          [R, H] or [R, N, H]   query-side table a^Q (``relative_queries``)
    rel_bias       [R, N]                per-head bias b (``relative_bias``)

R = scheme.num_ids (2 * max_distance + 1 for the default Shaw ids); N_kv = num_kv_heads (N unless
the key/value heads are grouped).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _cache_spec, _module_spec, _scheme_spec, _spec
from .attention import _check_types, relative_attention
from .buckets import ShawBuckets, _Scheme
from .cache import KVCache, attend_cache, init_kv_cache

_DEFAULT_MAX_DISTANCE = 16


class RelativeMultiHeadAttention(nn.Module):
    """Multi-head attention with relative positions (Shaw, T5, DeBERTa or BERT ids).

    The logits of query i, key j in head n (r = scheme id of the pair, kv = n // (N // N_kv)):
        e = scale * (q_i . k_j + q_i . a^K[r] + k_j . a^Q[r]) + b[r, n] - m_n |j - i - q_offset|
        z_i = sum_j softmax(e)_ij (v_j + a^V[r])

    Args:
        embed_dim: model width E of inputs and output.
        num_heads: number of query heads N.
        head_dim: per-head width H; default embed_dim // num_heads.
        max_distance: the Shaw shorthand: ``scheme=ShawBuckets(max_distance)``, tables of 2k + 1
            rows; default 16 when ``scheme`` is None too. Excludes ``scheme``.
        relative_keys: learn a key-side table a^K.
        relative_values: learn a value-side table a^V.
        share_relative_heads: one table row [H] for all heads, else per head [N, H] (a^K, a^V, a^Q).
        bias: biases on the four projections.
        dropout: dropout on the attention weights, active in ``.train()`` mode only.
        scale: logit scale; default 1 / sqrt(head_dim).
        scheme: a bucket scheme (``ShawBuckets``, ``T5Buckets``, ``DebertaBuckets``,
            ``BertBuckets``): the ids of every table, R = scheme.num_ids rows.
        relative_queries: learn a query-side table a^Q (``rel_q``; BERT relative_key_query,
            DeBERTa position-to-content).
        relative_bias: learn a per-head scalar bias table b [R, N] (``rel_bias``; T5).
        num_kv_heads: N_kv key/value heads (grouped-query attention); N % N_kv == 0, query
            head n reads key/value head n // (N // N_kv). Default N.
        shared_relative_table: one table ``rel_kv`` serves keys and values (OpenNMT-py), so
            training updates one parameter (its gradient is the sum of both uses); needs
            ``relative_keys`` and ``relative_values``.
        alibi_slopes: None, True (the ALiBi paper's slopes for N heads) or N floats m_n: adds
            -m_n |j - i - q_offset| to the logits. Fixed, not a parameter (the weight file
            records them).
        device, dtype: factory arguments for the parameters, as in ``torch.nn``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        max_distance: int | None = None,
        relative_keys: bool = True,
        relative_values: bool = True,
        share_relative_heads: bool = True,
        bias: bool = True,
        dropout: float = 0.0,
        scale: float | None = None,
        scheme: _Scheme | None = None,
        relative_queries: bool = False,
        relative_bias: bool = False,
        num_kv_heads: int | None = None,
        shared_relative_table: bool = False,
        alibi_slopes=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        head_dim = _spec.check_heads(embed_dim, num_heads, head_dim)
        _spec.check_dropout(dropout)
        self.scheme = _resolve_scheme(scheme, max_distance)
        for name, flag in (("relative_queries", relative_queries), ("relative_bias", relative_bias),
                           ("shared_relative_table", shared_relative_table)):
            _spec.check_bool(name, flag)
        _module_spec.check_shared_table(shared_relative_table, relative_keys, relative_values)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.num_kv_heads = _module_spec.check_kv_heads(num_heads, num_kv_heads)
        self.alibi_slopes = _module_spec.check_alibi_slopes(alibi_slopes, num_heads)
        self.max_distance = self.scheme.max_distance if isinstance(self.scheme, ShawBuckets) else None
        self.dropout, self.scale = dropout, scale
        E, N, N_kv, H, R = embed_dim, num_heads, self.num_kv_heads, head_dim, self.scheme.num_ids
        new = dict(device=device, dtype=dtype)
        self.w_q = nn.Parameter(torch.empty(E, N, H, **new))
        self.w_k = nn.Parameter(torch.empty(E, N_kv, H, **new))
        self.w_v = nn.Parameter(torch.empty(E, N_kv, H, **new))
        self.w_o = nn.Parameter(torch.empty(N, H, E, **new))
        for name, shape in (("b_q", (N, H)), ("b_k", (N_kv, H)), ("b_v", (N_kv, H)), ("b_o", (E,))):
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **new)) if bias else None)
        table = (R, H) if share_relative_heads else (R, N, H)
        for name, on in _table_names(relative_keys, relative_values, shared_relative_table, relative_queries):
            self.register_parameter(name, nn.Parameter(torch.empty(table, **new)) if on else None)
        self.rel_bias = nn.Parameter(torch.empty(R, N, **new)) if relative_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 1/fan_in) kernels, zero biases, Normal(0, 1/H) tables (rel_bias too)."""
        E, N, H = self.embed_dim, self.num_heads, self.head_dim
        for w in (self.w_q, self.w_k, self.w_v):
            nn.init.normal_(w, std=1 / math.sqrt(E))
        nn.init.normal_(self.w_o, std=1 / math.sqrt(N * H))
        for p in (self.b_q, self.b_k, self.b_v, self.b_o):
            if p is not None:
                nn.init.zeros_(p)
        for t in self._tables():
            nn.init.normal_(t, std=1 / math.sqrt(H))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        q_offset: int | torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Attend from ``query`` to ``key``/``value`` with relative positions.

        Args:
            query: [B, T, E].
            key: [B, S, E]; default ``query`` (self-attention).
            value: [B, S, E]; default ``key``.
            mask: bool, broadcastable to [B, N, T, S]; True = may attend.
            is_causal: key j visible to query i iff j <= i + (S - T).
            q_offset: position of query 0 among the keys for the relative ids (int or 0-d
                int tensor); default S - T (the queries are the last T key positions,
                matching ``is_causal``; 0 for self-attention).
            cache: a ``KVCache`` from ``init_cache`` (self-attention only, key, value
                and q_offset must be None), buffers [B, max_length, N_kv, H]. The keys/values
                of ``query`` are appended at positions [length, length + T) and the queries
                attend causally over the whole cache with q_offset = length (the scheme's ids
                and the ALiBi distances too). ``mask`` then covers the buffer, S = max_length
                (e.g. a per-sequence padding mask).

        Returns:
            [B, T, E]; with a cache, ``(out [B, T, E], new_cache)``.
        """
        _check_types(required=("query",), query=query, key=key, value=value)
        if cache is not None:
            _cache_spec.check_cache_call(key, value, q_offset)
        key = query if key is None else key
        value = key if value is None else value
        _spec.check_model_input("query", tuple(query.shape), self.embed_dim)
        _spec.check_model_input("key", tuple(key.shape), self.embed_dim, batch=query.shape[0])
        if tuple(value.shape) != tuple(key.shape):
            raise ValueError(f"value must have the shape of key {_spec.fmt(key.shape)}, got {_spec.fmt(value.shape)}")
        _check_dtype(self.w_q.dtype, query=query, key=key, value=value)
        if mask is not None and cache is None:
            query, key, value = _zero_unseen(mask, query, key, value, self.num_heads)
        q = _project(query, self.w_q, self.b_q)  # [B, T, N, H]
        k = _project(key, self.w_k, self.b_k)  # [B, S, N_kv, H]
        v = _project(value, self.w_v, self.b_v)  # [B, S, N_kv, H]
        if cache is not None:  # k, v become the buffers [B, max_length, N_kv, H]
            k, v, mask, q_offset, cache = attend_cache(cache, k, v, mask, num_heads=self.num_heads)
        z = relative_attention(  # "auto" may pick the banded Shaw path
            q, k, v, **self._relative_terms(q.shape[1], k.shape[1], q_offset, q),
            mask=mask, is_causal=is_causal, scale=self.scale, dropout_p=self.dropout if self.training else 0.0,
        )  # [B, T, N, H]
        out = torch.einsum("BTNH,NHE->BTE", z, self.w_o)
        out = out if self.b_o is None else out + self.b_o
        return out if cache is None else (out, cache)

    def init_cache(self, batch_size: int, max_length: int, *, dtype=None, device=None, checked: bool = False) -> KVCache:
        """An empty ``KVCache`` for ``forward(x, cache=...)``: buffers [B, max_length, N_kv, H].

        dtype and device default to the parameters'. ``checked=True``: overflow is
        checked inside ``torch.compile`` too (see ``update_kv_cache``).
        """
        dtype = self.w_q.dtype if dtype is None else dtype
        device = self.w_q.device if device is None else device
        return init_kv_cache(
            batch_size, max_length, self.num_kv_heads, self.head_dim, dtype=dtype, device=device, checked=checked
        )

    def extra_repr(self) -> str:
        tables = {n: tuple(t.shape) for n, t in zip(_TABLES, self._all_tables()) if t is not None}
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, scheme={self.scheme!r}, tables={tables}, alibi={self.alibi_slopes is not None}, "
            f"dropout={self.dropout}"
        )

    def _all_tables(self):
        return tuple(getattr(self, n) for n in _TABLES)

    def _tables(self):
        return [t for t in self._all_tables() if t is not None]

    def _relative_terms(self, T: int, S: int, q_offset, like: torch.Tensor) -> dict:
        """relative_attention's table, position and ALiBi arguments for T queries over S keys.

        The Shaw scheme goes by max_distance (its fast paths), any other by scheme=; q_offset
        default S - T. Without tables and ALiBi: plain attention, no positions.
        """
        rel_kv = self.rel_kv
        terms = dict(rel_k=self.rel_k if rel_kv is None else rel_kv, rel_v=self.rel_v if rel_kv is None else rel_kv,
                     rel_q=self.rel_q, rel_bias=self.rel_bias)
        if self.alibi_slopes is not None:
            terms["alibi_slopes"] = torch.tensor(self.alibi_slopes, dtype=like.dtype, device=like.device)  # [N]
        elif not self._tables():
            return terms
        terms["q_offset"] = S - T if q_offset is None else q_offset
        if self._tables():  # scheme= needs a table; the Shaw ids keep the max_distance fast paths
            shaw = isinstance(self.scheme, ShawBuckets)
            terms["max_distance" if shaw else "scheme"] = getattr(self.scheme, "max_distance") if shaw else self.scheme
        return terms

    def _weight_record(self) -> dict:
        """The options the weight file records for this layer ({} for today's layers), see ``weights.py``."""
        has_ids = bool(self._tables())
        return _module_spec.option_record(
            scheme_repr=repr(self.scheme) if has_ids and not isinstance(self.scheme, ShawBuckets) else None,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, relative_queries=self.rel_q is not None,
            relative_bias=self.rel_bias is not None, shared_relative_table=self.rel_kv is not None,
            alibi=self.alibi_slopes,
        )


# The relation tables in parameter order (the weight-file names).
_TABLES = ("rel_k", "rel_v", "rel_kv", "rel_q", "rel_bias")


def _table_names(relative_keys, relative_values, shared, relative_queries):
    """(name, present) of the [R, (N,) H] tables in creation order (the initialisers draw in it)."""
    return (("rel_k", relative_keys and not shared), ("rel_v", relative_values and not shared),
            ("rel_kv", shared), ("rel_q", relative_queries))


def _resolve_scheme(scheme, max_distance) -> _Scheme:
    """The layer's bucket scheme: ``scheme``, or ShawBuckets(max_distance) (default 16)."""
    if scheme is None:
        max_distance = _DEFAULT_MAX_DISTANCE if max_distance is None else max_distance
        _spec.check_positions(0, 0, max_distance)
        return ShawBuckets(max_distance)
    _scheme_spec.check_scheme_args(False, max_distance)  # max_distance is the Shaw shorthand: not both
    if not isinstance(scheme, _Scheme):
        raise TypeError("scheme must be ShawBuckets, T5Buckets, DebertaBuckets or BertBuckets, "
                        f"got {type(scheme).__name__}")
    return scheme


class RelationAwareAttention(nn.Module):
    """The seed-1 layer: per-head projections W [N, H, H] and caller-supplied relations.

    Args:
        num_heads: N.
        head_dim: H (input and output features per head).
        scale: logit scale; default 1 / sqrt(head_dim).
        dropout: dropout on the attention weights in ``.train()`` mode.
        device, dtype: factory arguments.
    """

    def __init__(self, num_heads: int, head_dim: int, *, scale: float | None = None, dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        _spec.check_heads(num_heads * head_dim if isinstance(head_dim, int) else 1, num_heads, head_dim)
        _spec.check_dropout(dropout)
        self.num_heads, self.head_dim, self.scale, self.dropout = num_heads, head_dim, scale, dropout
        new = dict(device=device, dtype=dtype)
        self.w_q = nn.Parameter(torch.empty(num_heads, head_dim, head_dim, **new))
        self.w_k = nn.Parameter(torch.empty(num_heads, head_dim, head_dim, **new))
        self.w_v = nn.Parameter(torch.empty(num_heads, head_dim, head_dim, **new))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_q, self.w_k, self.w_v):
            nn.init.normal_(w, std=1 / math.sqrt(self.head_dim))

    def forward(self, x: torch.Tensor, rel_k=None, rel_v=None, *, rel_ids=None, mask=None, is_causal=False):
        """x [B, S, N, H] -> [B, S, N, H]; rel_k/rel_v/rel_ids as in ``relative_attention``."""
        _check_types(required=("x",), x=x)
        want = (self.num_heads, self.head_dim)
        if x.dim() != 4 or tuple(x.shape[2:]) != want:
            raise ValueError(f"x must be [B, S, N, H] = [B, S, {want[0]}, {want[1]}], got shape {_spec.fmt(x.shape)}")
        _check_dtype(self.w_q.dtype, x=x)
        q = torch.einsum("BSNI,NIH->BSNH", x, self.w_q)
        k = torch.einsum("BSNI,NIH->BSNH", x, self.w_k)
        v = torch.einsum("BSNI,NIH->BSNH", x, self.w_v)
        return relative_attention(
            q, k, v, rel_k, rel_v, rel_ids=rel_ids, mask=mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
        )


def _zero_unseen(mask, query, key, value, N):
    """Zero the input rows that the mask leaves out altogether: queries that see no key (their
    output is 0 whatever they hold) and keys that no query sees. Exact, and a non-finite padded
    row then reaches no output and no gradient (the projections' weight gradients included)."""
    _check_types(mask=mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
    B, T, S = query.shape[0], query.shape[1], key.shape[1]
    _spec.check_mask_shape(tuple(mask.shape), _spec.Dims(B=B, T=T, S=S, N=N, H=1))
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # [B?, N?, T?, S?]
    q_seen, k_seen = m.any(-1).any(1), m.any(-2).any(1)  # [B?, T?], [B?, S?]
    query = torch.where(q_seen[..., None], query, 0)
    key_seen = k_seen[..., None]
    return query, torch.where(key_seen, key, 0), torch.where(key_seen, value, 0)


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = torch.einsum("BTE,ENH->BTNH", x, w)
    return y if b is None else y + b


def _check_dtype(param_dtype, **inputs) -> None:
    for name, t in inputs.items():
        if t.dtype != param_dtype:
            raise TypeError(
                f"{name} must have the parameters' dtype {param_dtype}, got {t.dtype} "
                f"(cast the input, or the module with .to({t.dtype}))"
            )
