"""The ``pallas_call`` launches of the fused kernels (``_fused_kernels.py``) for ``fused.py`` (JAX).

The torch package has no twin of this module: a Triton kernel launches as ``kernel[grid](...)`` in
``relattn_torch/fused.py``, while Pallas needs a block spec per operand and per backend (the Triton
backend on GPU, Mosaic on TPU, the interpreter), which are kept here.

Dimension legend as in ``attention.py``: B T S N H R; G query heads per key/value head; every array
is in the kernel layout [B, N, L, H] (see ``_fused_kernels.py``). ``forward`` runs the forward
kernel on the grid (B, N, T / BLOCK_T); ``backward`` the row pass on (B, N, T / BLOCK_T) and the
column pass on (B, N_kv, S / BLOCK_S).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._fused_kernels import _dkv_kernel, _dq_kernel, _fwd_kernel

_NUM_STAGES = 2  # Triton software-pipelining stages of the tile loops (as in jax's Pallas attention)


def _tiled(rows: int, width: int):
    """Tile x of the grid's last axis: [rows, width] of a [B, N, L, width] array."""
    return pl.BlockSpec((None, None, rows, width), lambda b, n, x: (b, n, x, 0))


def _whole(length: int, width: int, groups: int = 1):
    """The whole [length, width] slice of one (batch, head); ``groups`` G: read by query head n, the
    array has N / G heads (grouped keys and values: head n // G)."""
    def index(b, n, x):  # lax.div: n >= 0, and // lowers through sign, which Mosaic lowers only on a TPU
        return (b, lax.div(n, jnp.int32(groups)) if groups > 1 else n, 0, 0)

    return pl.BlockSpec((None, None, length, width), index)


def _group(length: int, width: int, groups: int):
    """The G heads [G, length, width] of one key/value head's group (column pass, grid over N_kv)."""
    return pl.BlockSpec((None, groups, length, width), lambda b, n, x: (b, n, 0, 0))


def _group_cols(rows: int, block: int, groups: int):
    """Key tile x [G, rows, block] of the group's heads of a [B, N, rows, S] array (ka, F)."""
    return pl.BlockSpec((None, groups, rows, block), lambda b, n, x: (b, n, 0, x))


def _mask(shape, by_rows: bool, block: int, groups: int | None = None):
    """Tiles of a [B|1, N|1, T|1, S|1] mask: rows (forward, row pass) or keys (column pass) by the
    grid's tile index, the other axis whole; size-1 dims stay size 1 (they broadcast in the tile).
    The column pass (``groups`` G) takes the group's G heads, or the one head of a mask without
    a head axis."""
    mb, mn, mt, ms = shape
    tiled_t, tiled_s = by_rows and mt > 1, (not by_rows) and ms > 1
    heads = None if groups is None else (groups if mn > 1 else 1)
    block_shape = (None, heads, block if tiled_t else mt, block if tiled_s else ms)

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


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def forward(cfg, meta, q, k, v, qa, ka, mask):
    """o = sum_j p_ij v_j [B, N, T, H], lse [B, N, T, 1] and the bucket masses C [B, N, T, R] (R = 1
    without ``cfg.want_c``), all float32. qa [B, N, T, R] and ka [B, N, R, S] (float32) or None."""
    B, N, T, H = q.shape
    S, G, bt = k.shape[2], cfg.groups, cfg.block_t
    R, Rc = cfg.R, cfg.R if cfg.want_c else 1
    in_specs = [_meta(cfg, meta), _tiled(bt, H), _whole(S, H, G), _whole(S, H, G),
                _tiled(bt, R) if cfg.has_qa else None, _whole(R, S) if cfg.has_ka else None,
                _mask(mask.shape, True, bt) if mask is not None else None]
    out_shape = [_f32(B, N, T, H), _f32(B, N, T, 1), _f32(B, N, T, Rc)]
    out_specs = [_tiled(bt, H), _tiled(bt, 1), _tiled(bt, Rc)]
    return _call(cfg, _fwd_kernel, (B, N, T // bt), in_specs, out_specs, out_shape, "relattn_fused_fwd")(
        meta, q, k, v, qa, ka, mask)


def backward(cfg, meta, q, k, v, qa, ka, gv, mask, lse, dlt, do):
    """dq (float32, without the table terms), E [B, N, T, R] and F [B, N, R, S] (float32, or None
    without qa / ka), dk and dv (input dtype, summed over each key/value head's group)."""
    B, N, T, H = q.shape
    S, G, bt, bs = k.shape[2], cfg.groups, cfg.block_t, cfg.block_s
    R, Re, Rv = cfg.R, cfg.R if cfg.has_qa else 1, cfg.R if cfg.want_c else 1
    rows = [_tiled(bt, H), _whole(S, H, G), _whole(S, H, G), _tiled(bt, Re) if cfg.has_qa else None,
            _whole(R, S) if cfg.has_ka else None, _tiled(bt, Rv) if cfg.want_c else None,
            _mask(mask.shape, True, bt) if mask is not None else None, _tiled(bt, 1), _tiled(bt, 1), _tiled(bt, H)]
    args = (meta, q, k, v, qa, ka, gv, mask, lse, dlt, do)
    dq, e = _call(cfg, _dq_kernel, (B, N, T // bt), [_meta(cfg, meta)] + rows, [_tiled(bt, H), _tiled(bt, Re)],
                  [_f32(B, N, T, H), _f32(B, N, T, Re)], "relattn_fused_dq")(*args)
    cols = [_group(T, H, G), _tiled(bs, H), _tiled(bs, H), _group(T, Re, G) if cfg.has_qa else None,
            _group_cols(R, bs, G) if cfg.has_ka else None, _group(T, Rv, G) if cfg.want_c else None,
            _mask(mask.shape, False, bs, G) if mask is not None else None, _group(T, 1, G), _group(T, 1, G),
            _group(T, H, G)]
    outs = [_tiled(bs, H), _tiled(bs, H), _group_cols(R, bs, G) if cfg.has_ka else None]
    shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
              _f32(B, N, R, S) if cfg.has_ka else None]
    dk, dv, f = _call(cfg, _dkv_kernel, (B, N // G, S // bs), [_meta(cfg, meta)] + cols, outs, shapes,
                      "relattn_fused_dkv")(*args)
    return dq, (e if cfg.has_qa else None), dk, dv, f
