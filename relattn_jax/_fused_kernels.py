"""The Pallas kernel bodies and their ``pallas_call`` launches for ``fused.py`` (JAX).

Twin of ``relattn_torch/_fused_kernels.py`` (the Triton kernels); both packages keep the public
function, checks and gradient wiring in ``fused.py`` and the kernels here. This one also holds the
launches: Pallas needs a block spec per operand and per backend (the Triton backend on GPU, Mosaic on
TPU, the interpreter), and with them ``fused.py`` would pass the house limit of ~400 lines.

Dimension legend as in ``attention.py``: B T S N H R. Every array here is in the kernel layout
[B, N, T, H] / [B, N, S, H] with T, S padded to whole tiles and H, R padded to powers of two.
One program handles one (batch, head, tile) triple:
    forward   grid (B, N, T / BLOCK_T): loop over key tiles, online softmax (m, l), acc and the
              bucket masses C [BLOCK_T, R], all rescaled together; o = acc / l and C / l (the
              value term C @ A^V is one einsum after the kernel, as in the torch twin).
    row pass  grid (B, N, T / BLOCK_T): recompute p from lse; dq and E (bucket sums of ds).
    col pass  grid (B, N, S / BLOCK_S): loop over query tiles; dk and dv.
Relation ids enter only through ``bucket`` and two tile loops over the ids a tile holds
(``_expand`` reads a [BLOCK_T, R] table at the ids, ``_reduce`` sums a tile into buckets): no gather,
which Pallas' Triton lowering lacks, and no [B, N, T, S] array anywhere. As in the twin, ``bucket`` is
the one public name; ``fused.py`` calls the launches ``_forward`` and ``_backward``.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# Masked logits inside a tile: finite, and far below any real logit (as in jax's Pallas attention).
_MASKED = -0.7 * float(np.finfo(np.float32).max)
_NUM_STAGES = 2  # Triton software-pipelining stages of the tile loops (as in jax's Pallas attention)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static sizes and switches of one call (hashable: it keys jax's trace caches)."""

    T: int  # true query length (rows >= T are padding)
    S: int  # true key length
    K: int  # max_distance
    scale: float
    causal: bool
    block_t: int
    block_s: int
    keys: bool  # a key table (qa) is given
    values: bool  # a value table (A^V) is given
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


def _expand(x, ids, r_lo, r_hi, planted_bug=None):
    """x [BLOCK_T, R] read at ids [BLOCK_T, BLOCK_S] -> [BLOCK_T, BLOCK_S], one id at a time."""
    if planted_bug == "gather":  # test hook: the gather Pallas' Triton lowering lacks
        return jnp.take_along_axis(x, ids, axis=1)
    rcol = _iota((1, x.shape[1]), 1)

    def body(r, out):
        col = jnp.sum(jnp.where(rcol == r, x, 0.0), axis=1, keepdims=True)  # [BLOCK_T, 1]
        return jnp.where(ids == r, col, out)

    return lax.fori_loop(r_lo, r_hi + 1, body, jnp.zeros(ids.shape, jnp.float32))


def _reduce(y, ids, r_lo, r_hi, acc, planted_bug=None):
    """acc [BLOCK_T, R] plus the bucket sums of y [BLOCK_T, BLOCK_S] (sum of y over keys with id r)."""
    rcol = _iota((1, acc.shape[1]), 1)
    hi = r_hi if planted_bug == "dropped_bucket" else r_hi + 1

    def body(r, acc):
        sums = jnp.sum(jnp.where(ids == r, y, 0.0), axis=1, keepdims=True)  # [BLOCK_T, 1]
        return acc + jnp.where(rcol == r, sums, 0.0)

    return lax.fori_loop(r_lo, hi, body, acc)


def _scalars(cfg, meta_ref):
    """q_offset and this example's key end min(key_lengths[b], S), read once per program."""
    return meta_ref[0], jnp.minimum(meta_ref[1 + pl.program_id(0)], cfg.S)


def _tile(cfg, scalars, mask_ref, i0, j0, rows_from_ref, cols_from_ref):
    """Ids and visibility of the tile of rows i0 .. i0 + BLOCK_T, keys j0 .. j0 + BLOCK_S."""
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
        vis = vis & (mask_ref[tr, tc] != 0)  # [BLOCK_T or 1, BLOCK_S or 1] broadcasts
    r_lo, r_hi = _id_range(cfg, i0, j0, off)
    return ids, vis, r_lo, r_hi


def _key_tiles(cfg, scalars, i0):
    """Number of key tiles a row tile can see: up to the key length, the causal edge."""
    end = scalars[1]
    if cfg.causal:
        end = jnp.minimum(end, i0 + cfg.block_t + cfg.S - cfg.T)
    return lax.div(jnp.maximum(end + cfg.block_s - 1, 0), jnp.int32(cfg.block_s))  # operands >= 0: plain division


def _fwd_kernel(meta_ref, q_ref, k_ref, v_ref, qa_ref, mask_ref, o_ref, lse_ref, c_ref, *, cfg):
    i0 = pl.program_id(2) * cfg.block_t
    scalars = _scalars(cfg, meta_ref)
    q = q_ref[...]  # [BLOCK_T, H]
    qa = qa_ref[...] if cfg.keys else None  # [BLOCK_T, R], float32, scaled

    def body(jt, carry):
        m, l, acc, cm = carry
        j0 = jt * cfg.block_s
        ids, vis, r_lo, r_hi = _tile(cfg, scalars, mask_ref, i0, j0, False, True)
        s = _dot(q, k_ref[pl.ds(j0, cfg.block_s), :], trans_b=True) * cfg.scale  # [BLOCK_T, BLOCK_S]
        if cfg.keys:
            s = s + _expand(qa, ids, r_lo, r_hi, cfg.planted_bug)
        s = jnp.where(vis, s, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [BLOCK_T, 1]
        alpha = jnp.exp(m - m_new)
        p = jnp.where(vis, jnp.exp(s - m_new), 0.0)  # [BLOCK_T, BLOCK_S]
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[pl.ds(j0, cfg.block_s), :]
        acc = alpha * acc + _dot(p.astype(v.dtype), v)  # [BLOCK_T, H]
        if cfg.values:
            cm = _reduce(p, ids, r_lo, r_hi, alpha * cm, cfg.planted_bug)  # [BLOCK_T, R]
        return m_new, l, acc, cm

    bt, h, r = cfg.block_t, q_ref.shape[-1], c_ref.shape[-1]
    init = (jnp.full((bt, 1), _MASKED, jnp.float32), jnp.zeros((bt, 1), jnp.float32),
            jnp.zeros((bt, h), jnp.float32), jnp.zeros((bt, r), jnp.float32))
    m, l, acc, cm = lax.fori_loop(0, _key_tiles(cfg, scalars, i0), body, init)
    seen = l > 0.0  # rows that see no key: output 0, lse 0 (p is masked to 0 in the backward anyway)
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)  # [BLOCK_T, 1]
    o_ref[...] = acc * inv  # float32; the value term C @ A^V is added after the kernel
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    c_ref[...] = cm * inv


def _probs_and_ds(cfg, tile, q, k, v, do, qa, gv, lse, dlt):
    """p and ds = p (dp - D) of one tile, p recomputed from the logits and lse ([BLOCK_T, BLOCK_S])."""
    ids, vis, r_lo, r_hi = tile
    s = _dot(q, k, trans_b=True) * cfg.scale
    if cfg.keys:
        s = s + _expand(qa, ids, r_lo, r_hi, cfg.planted_bug)
    p = jnp.where(vis, jnp.exp(s - lse), 0.0)
    dp = _dot(do, v, trans_b=True)
    if cfg.values:
        dp = dp + _expand(gv, ids, r_lo, r_hi, cfg.planted_bug)
    return p, p * (dp - dlt)


def _dq_kernel(meta_ref, q_ref, k_ref, v_ref, qa_ref, gv_ref, mask_ref, lse_ref, d_ref, do_ref,
               dq_ref, e_ref, *, cfg):
    """Row pass: dq = c sum_j ds_ij k_j (the table term is added outside) and E [BLOCK_T, R]."""
    i0 = pl.program_id(2) * cfg.block_t
    scalars = _scalars(cfg, meta_ref)
    q, do, lse, dlt = q_ref[...], do_ref[...], lse_ref[...], d_ref[...]
    qa = qa_ref[...] if cfg.keys else None
    gv = gv_ref[...] if cfg.values else None

    def body(jt, carry):
        dq, e = carry
        j0 = jt * cfg.block_s
        tile = _tile(cfg, scalars, mask_ref, i0, j0, False, True)
        k = k_ref[pl.ds(j0, cfg.block_s), :]
        _, ds = _probs_and_ds(cfg, tile, q, k, v_ref[pl.ds(j0, cfg.block_s), :], do, qa, gv, lse, dlt)
        dq = dq + _dot(ds.astype(k.dtype), k)  # [BLOCK_T, H]
        if cfg.keys:
            ids, _, r_lo, r_hi = tile
            e = _reduce(ds, ids, r_lo, r_hi, e, cfg.planted_bug)  # [BLOCK_T, R]
        return dq, e

    r = e_ref.shape[-1] if cfg.keys else 1
    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((cfg.block_t, r), jnp.float32))
    dq, e = lax.fori_loop(0, _key_tiles(cfg, scalars, i0), body, init)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    e_ref[...] = e


def _query_tiles(cfg, scalars, j0):
    """First and end query tile that can see keys j0 ..: the causal edge, the key length."""
    n = -(-cfg.T // cfg.block_t)
    lo = lax.div(jnp.maximum(j0 - (cfg.S - cfg.T), 0), jnp.int32(cfg.block_t)) if cfg.causal else 0
    live = j0 < scalars[1]
    return lo, jnp.where(live, n, lo)


def _dkv_kernel(meta_ref, q_ref, k_ref, v_ref, qa_ref, gv_ref, mask_ref, lse_ref, d_ref, do_ref,
                dk_ref, dv_ref, *, cfg):
    """Column pass: dk = c sum_i ds_ij q_i and dv = sum_i p_ij dO_i for one key tile."""
    j0 = pl.program_id(2) * cfg.block_s
    scalars = _scalars(cfg, meta_ref)
    k, v = k_ref[...], v_ref[...]  # [BLOCK_S, H]

    def body(it, carry):
        dk, dv = carry
        i0 = it * cfg.block_t
        rows = pl.ds(i0, cfg.block_t)
        tile = _tile(cfg, scalars, mask_ref, i0, j0, True, False)
        q, do = q_ref[rows, :], do_ref[rows, :]
        qa = qa_ref[rows, :] if cfg.keys else None
        gv = gv_ref[rows, :] if cfg.values else None
        p, ds = _probs_and_ds(cfg, tile, q, k, v, do, qa, gv, lse_ref[rows, :], d_ref[rows, :])
        dv = dv + _dot_tn(p.astype(do.dtype), do)  # [BLOCK_S, H]
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    lo, hi = _query_tiles(cfg, scalars, j0)
    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(lo, hi, body, init)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --- launches -------------------------------------------------------------------------------------

def _tiled(rows: int, width: int):
    """Tile x of the grid's last axis: [rows, width] of a [B, N, L, width] array."""
    return pl.BlockSpec((None, None, rows, width), lambda b, n, x: (b, n, x, 0))


def _whole(length: int, width: int):
    """The whole [length, width] slice of one (batch, head)."""
    return pl.BlockSpec((None, None, length, width), lambda b, n, x: (b, n, 0, 0))


def _mask(shape, by_rows: bool, block: int):
    """Tiles of a [B|1, N|1, T|1, S|1] mask: rows (forward, row pass) or keys (column pass) by the
    grid's tile index, the other axis whole; size-1 dims stay size 1 (they broadcast in the tile)."""
    mb, mn, mt, ms = shape
    tiled_t, tiled_s = by_rows and mt > 1, (not by_rows) and ms > 1
    block_shape = (None, None, block if tiled_t else mt, block if tiled_s else ms)

    def index(b, n, x):
        return (b if mb > 1 else 0, n if mn > 1 else 0, x if tiled_t else 0, x if tiled_s else 0)

    return pl.BlockSpec(block_shape, index)


def _meta(cfg, meta):
    """[q_offset, key_lengths...] int32: runtime scalars (SMEM on TPU, a pointer on GPU)."""
    if cfg.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec(meta.shape, lambda b, n, x: (0,))


def _call(cfg, kernel, grid, in_specs, out_specs, out_shape, name):
    if cfg.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    else:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=_NUM_STAGES)
    return pl.pallas_call(partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, compiler_params=params,
                          interpret=cfg.platform == "interpret", name=name)


def _forward(cfg, meta, q, k, v, qa, r_values, mask):
    """o = sum_j p_ij v_j [B, N, T, H], lse [B, N, T, 1] and the bucket masses C [B, N, T, R] (R =
    ``r_values``, 1 without a value table), all float32."""
    B, N, T, H = q.shape
    S = k.shape[2]
    bt = cfg.block_t
    R = r_values
    in_specs = [_meta(cfg, meta), _tiled(bt, H), _whole(S, H), _whole(S, H),
                _tiled(bt, qa.shape[-1]) if cfg.keys else None,
                _mask(mask.shape, True, bt) if mask is not None else None]
    out_shape = [jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, N, T, 1), jnp.float32),
                 jax.ShapeDtypeStruct((B, N, T, R), jnp.float32)]
    out_specs = [_tiled(bt, H), _tiled(bt, 1), _tiled(bt, R)]
    return _call(cfg, _fwd_kernel, (B, N, T // bt), in_specs, out_specs, out_shape, "relattn_fused_fwd")(
        meta, q, k, v, qa, mask)


def _backward(cfg, meta, q, k, v, qa, gv, mask, lse, dlt, do):
    """dq (float32, without the table term), E [B, N, T, R] (float32), dk and dv (input dtype)."""
    B, N, T, H = q.shape
    S = k.shape[2]
    bt, bs = cfg.block_t, cfg.block_s
    R = qa.shape[-1] if cfg.keys else 1
    rows = [_tiled(bt, H), _whole(S, H), _whole(S, H), _tiled(bt, R) if cfg.keys else None,
            _tiled(bt, gv.shape[-1]) if cfg.values else None,
            _mask(mask.shape, True, bt) if mask is not None else None, _tiled(bt, 1), _tiled(bt, 1), _tiled(bt, H)]
    dq, e = _call(cfg, _dq_kernel, (B, N, T // bt), [_meta(cfg, meta)] + rows, [_tiled(bt, H), _tiled(bt, R)],
                  [jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, N, T, R), jnp.float32)],
                  "relattn_fused_dq")(meta, q, k, v, qa, gv, mask, lse, dlt, do)
    cols = [_whole(T, H), _tiled(bs, H), _tiled(bs, H), _whole(T, R) if cfg.keys else None,
            _whole(T, gv.shape[-1]) if cfg.values else None,
            _mask(mask.shape, False, bs) if mask is not None else None, _whole(T, 1), _whole(T, 1), _whole(T, H)]
    dk, dv = _call(cfg, _dkv_kernel, (B, N, S // bs), [_meta(cfg, meta)] + cols, [_tiled(bs, H), _tiled(bs, H)],
                   [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                   "relattn_fused_dkv")(meta, q, k, v, qa, gv, mask, lse, dlt, do)
    return dq, e, dk, dv
