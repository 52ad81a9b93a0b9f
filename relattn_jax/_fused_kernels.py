"""The Pallas kernel bodies for ``fused.py`` (JAX).

Twin of ``relattn_torch/_fused_kernels.py`` (the Triton kernels); both packages keep the public
function, checks and gradient wiring in ``fused.py`` and the kernels here. Their ``pallas_call``
launches (a block spec per operand and per backend) are in ``_fused_launch.py``.

Dimension legend as in ``attention.py``: B T S N H R. Every array here is in the kernel layout
[B, N, T, H] / [B, N_kv, S, H] with T, S padded to whole tiles and H, R padded to powers of two.
The relation terms arrive as additive logits made outside: s_ij = c q_i.k_j + qa_i[r_ij] + ka_j[r_ij],
with qa [B, N, T, R] (row terms) and ka [B, N, R, S] (column terms, stored transposed so that a key
tile's ids are a [R, BLOCK_S] slice). Query head n reads key/value head n // G.
    forward   grid (B, N, T / BLOCK_T): loop over key tiles, online softmax (m, l), acc and the
              bucket masses C [BLOCK_T, R], all rescaled together; o = acc / l and C / l (the
              value term C @ A^V is one einsum after the kernel, as in the torch twin).
    row pass  grid (B, N, T / BLOCK_T): recompute p from lse; dq and E (row bucket sums of ds).
    col pass  grid (B, N_kv, S / BLOCK_S): loop over the G query heads of the key/value head and
              their query tiles; dk, dv (summed over the group) and F (column bucket sums of ds,
              per query head).
Relation ids enter only through ``bucket`` and two tile loops over the ids a tile holds
(``_expand`` reads a [BLOCK_T, R] or [R, BLOCK_S] table at the ids, ``_reduce`` sums a tile into
buckets along keys or queries): no gather, which Pallas' Triton lowering lacks, and no
[B, N, T, S] array anywhere. As in the twin, ``bucket`` is the one public name.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# Masked logits inside a tile: finite, and far below any real logit (as in jax's Pallas attention).
_MASKED = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static sizes and switches of one call (hashable: it keys jax's trace caches)."""

    T: int  # true query length (rows >= T are padding)
    S: int  # true key length
    K: int  # the Shaw clip: max_distance, or shaw_width of the scheme
    R: int  # relation ids 2K + 1 padded to a power of two: the width of qa, ka, C, E and F
    scale: float
    causal: bool
    block_t: int
    block_s: int
    has_qa: bool  # row terms qa (key table and/or bias) are given
    has_ka: bool  # column terms ka (query-side table) are given
    want_c: bool  # a value table (A^V) is given: the forward keeps the bucket masses C
    groups: int  # G: query heads per key/value head
    mask_shape: tuple | None  # the padded 4-d mask's shape, or None
    platform: str  # "gpu", "tpu" or "interpret": which block specs and compiler params
    num_warps: int
    planted_bug: str | None = None  # test hook: "band_edge", "dropped_bucket" or "gather"


def bucket(distance, K: int, planted_bug=None):
    """Relation id of a key at ``distance`` = j - i - q_offset: Shaw's clip(distance, -K, K) + K.

    Must be non-decreasing in ``distance``: a tile's ids then lie between the ids of its two corner
    distances, and the tile loops visit just those.
    """
    if planted_bug == "band_edge":
        return jnp.clip(distance, -K, K - 1) + K
    return jnp.clip(distance, -K, K) + K


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _dot(a, b, trans_b=False):
    """a @ b (or a @ b.T) accumulated in float32; exact float32 products for float32 inputs."""
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=(prec, prec), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a.T @ b accumulated in float32 ([BLOCK_T, X] x [BLOCK_T, Y] -> [X, Y])."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=(prec, prec),
                           preferred_element_type=jnp.float32)


def _id_range(cfg, i0, j0, off):
    """First and last relation id in the tile of rows i0.., keys j0.. (bucket is monotone)."""
    d_min = j0 - (i0 + cfg.block_t - 1) - off
    d_max = j0 + cfg.block_s - 1 - i0 - off
    return bucket(d_min, cfg.K, cfg.planted_bug), bucket(d_max, cfg.K, cfg.planted_bug)


def _expand(x, ids, r_lo, r_hi, by_rows=True, planted_bug=None):
    """x read at ids [BLOCK_T, BLOCK_S] -> [BLOCK_T, BLOCK_S], one id at a time: x is [BLOCK_T, R]
    (``by_rows``: entry (i, j) is x[i, ids_ij]) or [R, BLOCK_S] (entry (i, j) is x[ids_ij, j])."""
    if planted_bug == "gather":  # test hook: the gather Pallas' Triton lowering lacks
        return jnp.take_along_axis(x, ids, axis=1) if by_rows else jnp.take_along_axis(x, ids, axis=0)
    axis = 1 if by_rows else 0
    rid = _iota((1, x.shape[1]) if by_rows else (x.shape[0], 1), axis)

    def body(r, out):
        line = jnp.sum(jnp.where(rid == r, x, 0.0), axis=axis, keepdims=True)  # [BLOCK_T, 1] or [1, BLOCK_S]
        return jnp.where(ids == r, line, out)

    return lax.fori_loop(r_lo, r_hi + 1, body, jnp.zeros(ids.shape, jnp.float32))


def _reduce(y, ids, r_lo, r_hi, acc, by_rows=True, planted_bug=None):
    """acc plus the bucket sums of y [BLOCK_T, BLOCK_S]: acc [BLOCK_T, R] (``by_rows``: sum over the
    keys of each row with id r) or [R, BLOCK_S] (sum over the queries of each key with id r)."""
    axis = 1 if by_rows else 0
    rid = _iota((1, acc.shape[1]) if by_rows else (acc.shape[0], 1), axis)
    hi = r_hi if planted_bug == "dropped_bucket" else r_hi + 1

    def body(r, acc):
        sums = jnp.sum(jnp.where(ids == r, y, 0.0), axis=axis, keepdims=True)  # [BLOCK_T, 1] or [1, BLOCK_S]
        return acc + jnp.where(rid == r, sums, 0.0)

    return lax.fori_loop(r_lo, hi, body, acc)


def _scalars(cfg, meta_ref):
    """q_offset and this example's key end min(key_lengths[b], S), read once per program."""
    return meta_ref[0], jnp.minimum(meta_ref[1 + pl.program_id(0)], cfg.S)


def _tile(cfg, scalars, mask_ref, i0, j0, rows_from_ref, cols_from_ref, head=None):
    """Ids and visibility of the tile of rows i0 .. i0 + BLOCK_T, keys j0 .. j0 + BLOCK_S (``head``:
    the mask block's head index in the column pass, whose mask block spans the group's heads)."""
    off, klen = scalars
    rows = i0 + _iota((cfg.block_t, 1), 0)  # [BLOCK_T, 1]
    cols = j0 + _iota((1, cfg.block_s), 1)  # [1, BLOCK_S]
    ids = bucket(cols - rows - off, cfg.K, cfg.planted_bug)  # [BLOCK_T, BLOCK_S]
    vis = (rows < cfg.T) & (cols < klen)
    if cfg.causal:
        vis = vis & (cols <= rows + (cfg.S - cfg.T))
    if mask_ref is not None:
        t_full, s_full = cfg.mask_shape[2] > 1, cfg.mask_shape[3] > 1
        tr = pl.ds(i0, cfg.block_t) if (t_full and rows_from_ref) else slice(None)
        tc = pl.ds(j0, cfg.block_s) if (s_full and cols_from_ref) else slice(None)
        tile = mask_ref[tr, tc] if head is None else mask_ref[head if cfg.mask_shape[1] > 1 else 0, tr, tc]
        vis = vis & (tile != 0)  # [BLOCK_T or 1, BLOCK_S or 1] broadcasts
    r_lo, r_hi = _id_range(cfg, i0, j0, off)
    return ids, vis, r_lo, r_hi


def _key_tiles(cfg, scalars, i0):
    """Number of key tiles a row tile can see: up to the key length, the causal edge."""
    end = scalars[1]
    if cfg.causal:
        end = jnp.minimum(end, i0 + cfg.block_t + cfg.S - cfg.T)
    return lax.div(jnp.maximum(end + cfg.block_s - 1, 0), jnp.int32(cfg.block_s))  # operands >= 0: plain division


def _logits(cfg, tile, q, k, qa, ka):
    """s = c q k^T + qa[r_ij] + ka[r_ij] of one tile, before masking ([BLOCK_T, BLOCK_S], float32)."""
    ids, _, r_lo, r_hi = tile
    s = _dot(q, k, trans_b=True) * cfg.scale
    if cfg.has_qa:
        s = s + _expand(qa, ids, r_lo, r_hi, True, cfg.planted_bug)  # qa [BLOCK_T, R]
    if cfg.has_ka:
        s = s + _expand(ka, ids, r_lo, r_hi, False, cfg.planted_bug)  # ka [R, BLOCK_S]
    return s


def _fwd_kernel(meta_ref, q_ref, k_ref, v_ref, qa_ref, ka_ref, mask_ref, o_ref, lse_ref, c_ref, *, cfg):
    i0 = pl.program_id(2) * cfg.block_t
    scalars = _scalars(cfg, meta_ref)
    q = q_ref[...]  # [BLOCK_T, H]
    qa = qa_ref[...] if cfg.has_qa else None  # [BLOCK_T, R], float32

    def body(jt, carry):
        m, l, acc, cm = carry
        j0 = jt * cfg.block_s
        keys = pl.ds(j0, cfg.block_s)
        tile = _tile(cfg, scalars, mask_ref, i0, j0, False, True)
        ids, vis, r_lo, r_hi = tile
        ka = ka_ref[:, keys] if cfg.has_ka else None  # [R, BLOCK_S], float32
        s = jnp.where(vis, _logits(cfg, tile, q, k_ref[keys, :], qa, ka), _MASKED)  # [BLOCK_T, BLOCK_S]
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [BLOCK_T, 1]
        alpha = jnp.exp(m - m_new)
        p = jnp.where(vis, jnp.exp(s - m_new), 0.0)  # [BLOCK_T, BLOCK_S]
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[keys, :]
        acc = alpha * acc + _dot(p.astype(v.dtype), v)  # [BLOCK_T, H]
        if cfg.want_c:
            cm = _reduce(p, ids, r_lo, r_hi, alpha * cm, True, cfg.planted_bug)  # [BLOCK_T, R]
        return m_new, l, acc, cm

    bt, h = cfg.block_t, q_ref.shape[-1]
    init = (jnp.full((bt, 1), _MASKED, jnp.float32), jnp.zeros((bt, 1), jnp.float32),
            jnp.zeros((bt, h), jnp.float32), jnp.zeros((bt, cfg.R if cfg.want_c else 1), jnp.float32))
    m, l, acc, cm = lax.fori_loop(0, _key_tiles(cfg, scalars, i0), body, init)
    seen = l > 0.0  # rows that see no key: output 0, lse 0 (p is masked to 0 in the backward anyway)
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)  # [BLOCK_T, 1]
    o_ref[...] = acc * inv  # float32; the value term C @ A^V is added after the kernel
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    c_ref[...] = cm * inv


def _probs_and_ds(cfg, tile, q, k, v, do, qa, ka, gv, lse, dlt):
    """p and ds = p (dp - D) of one tile, p recomputed from the logits and lse ([BLOCK_T, BLOCK_S])."""
    ids, vis, r_lo, r_hi = tile
    p = jnp.where(vis, jnp.exp(_logits(cfg, tile, q, k, qa, ka) - lse), 0.0)
    dp = _dot(do, v, trans_b=True)
    if cfg.want_c:
        dp = dp + _expand(gv, ids, r_lo, r_hi, True, cfg.planted_bug)  # gv = dC [BLOCK_T, R]
    return p, p * (dp - dlt)


def _dq_kernel(meta_ref, q_ref, k_ref, v_ref, qa_ref, ka_ref, gv_ref, mask_ref, lse_ref, d_ref, do_ref,
               dq_ref, e_ref, *, cfg):
    """Row pass: dq = c sum_j ds_ij k_j (the table terms are added outside) and E [BLOCK_T, R]."""
    i0 = pl.program_id(2) * cfg.block_t
    scalars = _scalars(cfg, meta_ref)
    q, do, lse, dlt = q_ref[...], do_ref[...], lse_ref[...], d_ref[...]
    qa = qa_ref[...] if cfg.has_qa else None
    gv = gv_ref[...] if cfg.want_c else None

    def body(jt, carry):
        dq, e = carry
        j0 = jt * cfg.block_s
        keys = pl.ds(j0, cfg.block_s)
        tile = _tile(cfg, scalars, mask_ref, i0, j0, False, True)
        k = k_ref[keys, :]
        ka = ka_ref[:, keys] if cfg.has_ka else None
        _, ds = _probs_and_ds(cfg, tile, q, k, v_ref[keys, :], do, qa, ka, gv, lse, dlt)
        dq = dq + _dot(ds.astype(k.dtype), k)  # [BLOCK_T, H]
        if cfg.has_qa:
            ids, _, r_lo, r_hi = tile
            e = _reduce(ds, ids, r_lo, r_hi, e, True, cfg.planted_bug)  # [BLOCK_T, R]
        return dq, e

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((cfg.block_t, cfg.R if cfg.has_qa else 1), jnp.float32))
    dq, e = lax.fori_loop(0, _key_tiles(cfg, scalars, i0), body, init)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    e_ref[...] = e


def _query_tiles(cfg, scalars, j0):
    """First and end query tile that can see keys j0 ..: the causal edge, the key length."""
    n = -(-cfg.T // cfg.block_t)
    lo = lax.div(jnp.maximum(j0 - (cfg.S - cfg.T), 0), jnp.int32(cfg.block_t)) if cfg.causal else 0
    live = j0 < scalars[1]
    return lo, jnp.where(live, n, lo)


def _dkv_kernel(meta_ref, q_ref, k_ref, v_ref, qa_ref, ka_ref, gv_ref, mask_ref, lse_ref, d_ref, do_ref,
                dk_ref, dv_ref, f_ref, *, cfg):
    """Column pass for one key tile of one key/value head: dk = c sum_{g, i} ds_ij q_i and
    dv = sum_{g, i} p_ij dO_i over the G query heads g of the group, and F [R, BLOCK_S] per head.
    The query-side refs hold the group's heads on their first axis."""
    j0 = pl.program_id(2) * cfg.block_s
    scalars = _scalars(cfg, meta_ref)
    k, v = k_ref[...], v_ref[...]  # [BLOCK_S, H]
    lo, hi = _query_tiles(cfg, scalars, j0)

    def head(g, carry):
        ka = ka_ref[g] if cfg.has_ka else None  # [R, BLOCK_S]

        def body(it, carry):
            dk, dv, f = carry
            i0 = it * cfg.block_t
            rows = pl.ds(i0, cfg.block_t)
            tile = _tile(cfg, scalars, mask_ref, i0, j0, True, False, head=g)
            q, do = q_ref[g, rows, :], do_ref[g, rows, :]
            qa = qa_ref[g, rows, :] if cfg.has_qa else None
            gv = gv_ref[g, rows, :] if cfg.want_c else None
            p, ds = _probs_and_ds(cfg, tile, q, k, v, do, qa, ka, gv, lse_ref[g, rows, :], d_ref[g, rows, :])
            dv = dv + _dot_tn(p.astype(do.dtype), do)  # [BLOCK_S, H]
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            if cfg.has_ka:
                ids, _, r_lo, r_hi = tile
                f = _reduce(ds, ids, r_lo, r_hi, f, False, cfg.planted_bug)  # [R, BLOCK_S]
            return dk, dv, f

        f0 = jnp.zeros((cfg.R if cfg.has_ka else 1, cfg.block_s), jnp.float32)
        dk, dv, f = lax.fori_loop(lo, hi, body, (*carry, f0))
        if cfg.has_ka:
            f_ref[g] = f
        return dk, dv

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, cfg.groups, head, init)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
