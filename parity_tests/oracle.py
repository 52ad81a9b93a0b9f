"""An independent float64 NumPy oracle, written straight from the equations.

    e_ij = (q_i . (k_j + a^K_ij) + k_j . a^Q_ij) * scale + b_ij[n] - m_n |j - i - q_offset|
    alpha_i = softmax_j(e_ij) over the keys visible to query i (all-zero if none)
    z_i = sum_j alpha_ij (v_j + a^V_ij)

with a^Q_ij = rel_q[r_ij] and b_ij = rel_bias[r_ij] (tables indexed by the relation ids), m the
ALiBi slopes (one per query head, q_offset default S - T), and grouped key/value heads: with
k, v of N_kv heads, query head n reads k, v of head n // (N / N_kv).
The bucket functions (Shaw, T5, DeBERTa) are scalar transcriptions of the published formulas,
one relative position at a time, with the logarithms in float32 as T5 and DeBERTa compute them.

Clarity over speed: explicit loops over batch, head and query; relation tables are
turned into dense per-example edge tensors first. Shares no code with the packages.
"""

from __future__ import annotations

import numpy as np


def shaw_ids(q_len: int, k_len: int, max_distance: int, q_offset: int = 0) -> np.ndarray:
    """ids[i, j] = clip(j - (i + q_offset), -k, k) + k, by a double loop."""
    ids = np.zeros((q_len, k_len), dtype=np.int64)
    for i in range(q_len):
        for j in range(k_len):
            ids[i, j] = min(max(j - (i + q_offset), -max_distance), max_distance) + max_distance
    return ids


def t5_bucket(relative: int, num_buckets: int, max_distance: int, bidirectional: bool) -> int:
    """T5's bucket of one relative position (key minus query), from mesh_tensorflow's definition."""
    half, bucket = num_buckets, 0
    if bidirectional:
        half = num_buckets // 2
        if relative > 0:
            bucket = half
        n = abs(relative)
    else:
        n = max(-relative, 0)
    exact = half // 2
    if n < exact:
        return bucket + n
    f32 = np.float32
    x = np.log(f32(f32(n) / f32(exact))) / f32(np.log(max_distance / exact)) * f32(half - exact)
    return bucket + min(exact + int(f32(x)), half - 1)


def deberta_delta(delta: int, position_buckets: int, max_relative_positions: int) -> int:
    """DeBERTa-v2's relative position (query minus key), log-bucketed when position_buckets > 0."""
    mid = position_buckets // 2
    if position_buckets <= 0 or abs(delta) <= mid:  # exact up to +-mid, log buckets beyond
        return delta
    f32 = np.float32
    ratio = np.log(f32((max_relative_positions - 1) / mid))
    x = f32(np.log(f32(f32(abs(delta)) / f32(mid))) / ratio * f32(mid - 1))
    return int(np.sign(delta)) * (int(np.ceil(x)) + mid)


def deberta_bucket(relative: int, position_buckets: int, max_relative_positions: int) -> int:
    """DeBERTa-v2's row of rel_embeddings for one pair: its delta is query minus key = -relative."""
    span = position_buckets if position_buckets > 0 else max_relative_positions
    delta = deberta_delta(-relative, position_buckets, max_relative_positions)
    return min(max(delta + span, 0), 2 * span - 1)


def bert_bucket(relative: int, max_position_embeddings: int) -> int:
    """BERT relative_key(_query)'s row of distance_embedding: distance = query - key = -relative, row
    distance + P - 1 (clipped to the 2P - 1 rows)."""
    row = -relative + max_position_embeddings - 1
    return min(max(row, 0), 2 * max_position_embeddings - 2)


def scheme_ids(bucket, q_len: int, k_len: int, q_offset: int = 0) -> np.ndarray:
    """ids[i, j] = bucket(j - (i + q_offset)), by a double loop."""
    ids = np.zeros((q_len, k_len), dtype=np.int64)
    for i in range(q_len):
        for j in range(k_len):
            ids[i, j] = bucket(j - (i + q_offset))
    return ids


def dense_bias(rel_bias, B, T, S, N, rel_ids) -> np.ndarray | None:
    """The bias table [R, N] at the ids as a dense [B, T, S, N] float64 array."""
    if rel_bias is None:
        return None
    rel_bias, ids = np.asarray(rel_bias, np.float64), np.asarray(rel_ids)
    out = np.zeros((B, T, S, N))
    for b in range(B):
        for i in range(T):
            for j in range(S):
                r = ids[i, j] if ids.ndim == 2 else ids[b if ids.shape[0] > 1 else 0, i, j]
                out[b, i, j] = rel_bias[r]
    return out


def dense_edges(a, B, T, S, N, H, rel_ids=None) -> np.ndarray | None:
    """Any accepted form of a relation term as a dense [B, T, S, N, H] float64 array."""
    if a is None:
        return None
    a = np.asarray(a, dtype=np.float64)
    out = np.zeros((B, T, S, N, H))
    for b in range(B):
        for i in range(T):
            for j in range(S):
                for n in range(N):
                    if rel_ids is not None:
                        ids = np.asarray(rel_ids)
                        r = ids[i, j] if ids.ndim == 2 else ids[b if ids.shape[0] > 1 else 0, i, j]
                        out[b, i, j, n] = a[r] if a.ndim == 2 else a[r, n if a.shape[1] > 1 else 0]
                    elif a.ndim == 3:  # [T, S, H]
                        out[b, i, j, n] = a[i if a.shape[0] > 1 else 0, j if a.shape[1] > 1 else 0]
                    else:  # [T, S, N, H] or [B, T, S, N, H], size-1 dims broadcast
                        full = a if a.ndim == 5 else a[None]
                        idx = [min(x, full.shape[ax] - 1) for ax, x in enumerate((b, i, j, n))]
                        out[b, i, j, n] = full[tuple(idx)]
    return out


def visibility(B, N, T, S, mask=None, is_causal=False) -> np.ndarray:
    """[B, N, T, S] bool: which keys each query sees."""
    vis = np.ones((B, N, T, S), dtype=bool)
    if mask is not None:
        vis &= np.broadcast_to(np.asarray(mask, dtype=bool), (B, N, T, S))
    if is_causal:
        for i in range(T):
            for j in range(S):
                if j > i + (S - T):
                    vis[:, :, i, j] = False
    return vis


def relative_attention(q, k, v, rel_k=None, rel_v=None, *, rel_ids=None, mask=None, is_causal=False, scale=None,
                       rel_q=None, rel_bias=None, max_distance=None, q_offset=None, alibi_slopes=None):
    """Oracle of ``relative_attention``: q [B, T, N, H], k, v [B, S, N_kv, H] -> [B, T, N, H]."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S = k.shape[1]
    group = N // k.shape[2]  # query heads per key/value head
    k, v = (np.stack([x[:, :, n // group] for n in range(N)], axis=2) for x in (k, v))  # [B, S, N, H]
    offset = S - T if q_offset is None else q_offset
    if max_distance is not None:
        rel_ids = shaw_ids(T, S, max_distance, offset)
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    ak = dense_edges(rel_k, B, T, S, N, H, rel_ids)
    av = dense_edges(rel_v, B, T, S, N, H, rel_ids)
    aq = dense_edges(rel_q, B, T, S, N, H, rel_ids)
    bias = dense_bias(rel_bias, B, T, S, N, rel_ids)
    vis = visibility(B, N, T, S, mask, is_causal)
    z = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            for i in range(T):
                keys = k[b, :, n, :] + (0 if ak is None else ak[b, i, :, n, :])  # [S, H]
                vals = v[b, :, n, :] + (0 if av is None else av[b, i, :, n, :])  # [S, H]
                e = keys @ q[b, i, n, :]  # [S]
                if aq is not None:
                    e = e + (k[b, :, n, :] * aq[b, i, :, n, :]).sum(-1)  # k_j . a^Q_ij
                e = e * scale
                if bias is not None:
                    e = e + bias[b, i, :, n]
                if alibi_slopes is not None:
                    e = e - float(alibi_slopes[n]) * np.array([abs(j - i - offset) for j in range(S)], np.float64)
                seen = vis[b, n, i]
                if not seen.any():
                    continue  # a query that sees nothing returns 0
                w = np.exp(e[seen] - e[seen].max())
                alpha = w / w.sum()
                z[b, i, n] = alpha @ vals[seen]
    return z


def multi_head_attention(params: dict, query, key=None, value=None, *, max_distance, mask=None,
                         is_causal=False, scale=None, q_offset=None):
    """Oracle of ``RelativeMultiHeadAttention`` from its named parameters (numpy arrays)."""
    query = np.asarray(query, np.float64)
    key = query if key is None else np.asarray(key, np.float64)
    value = key if value is None else np.asarray(value, np.float64)
    p = {name: (None if a is None else np.asarray(a, np.float64)) for name, a in params.items()}

    def proj(x, w, b):
        y = np.einsum("bte,enh->btnh", x, w)
        return y if b is None else y + b

    q = proj(query, p["w_q"], p.get("b_q"))
    k = proj(key, p["w_k"], p.get("b_k"))
    v = proj(value, p["w_v"], p.get("b_v"))
    T, S = query.shape[1], key.shape[1]
    ids = shaw_ids(T, S, max_distance, S - T if q_offset is None else q_offset)
    rel_k, rel_v = p.get("rel_k"), p.get("rel_v")
    use_ids = ids if (rel_k is not None or rel_v is not None) else None
    z = relative_attention(q, k, v, rel_k, rel_v, rel_ids=use_ids, mask=mask, is_causal=is_causal, scale=scale)
    out = np.einsum("btnh,nhe->bte", z, p["w_o"])
    return out if p.get("b_o") is None else out + p["b_o"]
