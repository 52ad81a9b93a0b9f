"""Fused Shaw relative attention: one Pallas kernel per pass, flash-style (JAX).

Dimension legend as in ``attention.py``: B T S N H R. Twin of ``relattn_torch/fused.py`` (Triton):
same function, arguments, tile names and order of steps.

Forward, per (batch, head, BLOCK_T query rows), over tiles of BLOCK_S keys:
    s = c q k^T + qa[r_ij]         qa = c q . A^K [T, R], one small GEMM before the kernel
    online softmax: running max m and sum l per row; acc += p v; bucket masses C [BLOCK_T, R] += the
    sums of p per relation id (acc and C rescaled together by exp(m_old - m_new))
    o = acc / l and C / l; lse = m + log l and C are kept for the backward.
Then out = o + C @ A^V, one small GEMM after the kernel (as the torch twin does).
Backward: D = rowsum(dO * out), gv = dO . A^V [T, R] (small GEMMs); a row pass recomputes p from lse
and makes dq and E (bucket sums of ds = p (dO v^T + gv[r_ij] - D)); a column pass makes dk and dv.
The table gradients c E^T Q and C^T dO, and dq's c E A^K, are plain einsums outside the kernels
(jax differentiates the small GEMMs around the kernel call). No [B, N, T, S] array is written and
there are no atomics. Ids come from ``_fused_kernels.bucket``; the kernel bodies and launches live
in ``_fused_kernels.py``.

Backends: the Triton backend of Pallas on GPU (``jax.experimental.pallas.triton.CompilerParams``;
Pallas' default GPU backend, Mosaic GPU, is not used), Mosaic on TPU, and the Pallas interpreter
anywhere when ``interpret=True`` or the environment sets ``RELATTN_PALLAS_INTERPRET=1``.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp

from . import _fused_kernels as kernels
from . import _spec

BLOCK_T = 64  # query rows per tile
BLOCK_S = 64  # keys per tile
_INTERPRET_ENV = "RELATTN_PALLAS_INTERPRET"
_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
_MIN_DIM = 16  # Triton's dot needs every tile dim >= 16; H and R are padded to powers of two >= this
_HIGHEST = jax.lax.Precision.HIGHEST
_TPU_TILE = 128  # lanes of a TPU vector register
# Heads wider than 128: 32 x 32 tiles (the row pass took 272 KiB of shared memory at 64 x 64, H = 256).
_WIDE_HEAD, _WIDE_HEAD_TILE = 128, 32
_WARPS_SMALL_H, _WARPS_LARGE_H = 4, 8  # Triton warps per program for H <= 64 and above (as jax's attention)
_TPU_MIN_JAX = (0, 10)  # the oldest jax whose Mosaic lowering of the kernel was checked (0.10.2); 0.7.1 fails
_PLANTED_BUG = None  # test hook: "band_edge", "dropped_bucket" or "gather" plants a known bug in the kernels


def unavailable(q=None) -> str | None:
    """Why the fused kernel cannot run for ``q`` here, or None when it can.

    None when the interpreter switch ``RELATTN_PALLAS_INTERPRET=1`` is set, or when q's platform
    (jax's default backend for tracers and non-arrays) is a GPU or a TPU.

    Args:
        q: the queries (any array; only its platform is read), or None for the default backend.

    Returns:
        None, or a one-line reason.
    """
    if os.environ.get(_INTERPRET_ENV) == "1":
        return None
    platform = _platform(q)
    if platform == "tpu" and jax.__version_info__ < _TPU_MIN_JAX:
        return (f"the fused Pallas kernel's TPU lowering needs jax >= {'.'.join(map(str, _TPU_MIN_JAX))} "
                f"(jax 0.7.1 fails in it), but jax {jax.__version__} is installed")
    if platform in ("gpu", "tpu"):
        return None
    return (f"the fused Pallas kernels need a GPU or TPU backend, but {platform!r} is in use; "
            f"set {_INTERPRET_ENV}=1 (or interpret=True) to run them in the Pallas interpreter")


def fused_attention(q, k, v, rel_k=None, rel_v=None, *, max_distance, q_offset=None, is_causal=False,
                    scale=None, mask=None, key_lengths=None, interpret=None) -> jax.Array:
    """Shaw relative attention in fused Pallas kernels; equals ``relative_attention`` with ``max_distance``.

    Args:
        q: queries [B, T, N, H]; float32, float16 or bfloat16.
        k: keys [B, S, N, H]; v: values [B, S, N, H]; same dtype as q.
        rel_k, rel_v: relation tables [R, H] (shared by heads) or [R, N, H], R = 2 * max_distance + 1,
            or None.
        max_distance: K >= 0; ids r_ij = clip(j - i - q_offset, -K, K) + K.
        q_offset: position of query 0 among the keys: int, 0-d int array, or traced; default S - T.
        is_causal: key j is visible to query i iff j <= i + (S - T) (bottom-right aligned).
        scale: logit scale; default 1 / sqrt(H).
        mask: bool, broadcastable to [B, N, T, S]; True means the query may attend the key. Read in
            tiles with its size-1 dims broadcast, never expanded.
        key_lengths: int [B]; key j of example b is visible iff j < key_lengths[b].
        interpret: run in the Pallas interpreter; None reads ``RELATTN_PALLAS_INTERPRET=1``.

    Returns:
        [B, T, N, H] in q's dtype. A query that sees no key returns exactly 0 (with zero gradients).
    """
    d = _check(q, k, v, rel_k, rel_v, max_distance, q_offset, mask, key_lengths)
    if interpret is None:
        interpret = os.environ.get(_INTERPRET_ENV) == "1"
    if not interpret and (reason := unavailable(q)) is not None:
        raise RuntimeError(reason)
    scale = d.H**-0.5 if scale is None else float(scale)
    off = d.S - d.T if q_offset is None else q_offset
    lengths = jnp.full((d.B,), d.S, jnp.int32) if key_lengths is None else jnp.asarray(key_lengths, jnp.int32)
    meta = jnp.concatenate([jnp.asarray(off, jnp.int32).reshape(1), lengths])  # [1 + B] int32
    cfg, pads = _config(d, max_distance, scale, is_causal, rel_k, rel_v, mask,
                        "interpret" if interpret else _platform(q))
    Tp, Sp, Hp, Rp = pads

    def layout(x, length):  # [B, L, N, H] -> [B, N, Lp, Hp]
        x = jnp.transpose(x, (0, 2, 1, 3))
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, Hp - d.H)))

    qa = None if rel_k is None else _key_table_product(q, rel_k, scale, Tp, Rp)
    av = None if rel_v is None else _value_table(rel_v, Rp, Hp)
    out = _fused(cfg, meta, layout(q, Tp), layout(k, Sp), layout(v, Sp), qa, av, _tile_mask(mask, Tp, Sp))
    return jnp.transpose(out[:, :, : d.T, : d.H], (0, 2, 1, 3))


def _key_table_product(q, rel_k, scale, Tp, Rp):
    """qa = c q . A^K as float32 [B, N, Tp, Rp] (the small GEMM before the kernels; jax differentiates it)."""
    layout = "RH" if rel_k.ndim == 2 else "RNH"
    qa = jnp.einsum(f"BTNH,{layout}->BNTR", q.astype(jnp.float32), rel_k.astype(jnp.float32),
                    precision=_HIGHEST) * scale  # [B, N, T, R]
    return jnp.pad(qa, ((0, 0), (0, 0), (0, Tp - qa.shape[2]), (0, Rp - qa.shape[3])))


def _value_table(rel_v, Rp, Hp):
    """A^V as [N or 1, Rp, Hp] in its dtype (a shared table keeps one copy)."""
    av = rel_v[None] if rel_v.ndim == 2 else jnp.transpose(rel_v, (1, 0, 2))  # [N or 1, R, H]
    return jnp.pad(av, ((0, 0), (0, Rp - av.shape[1]), (0, Hp - av.shape[2])))


def _platform(q=None) -> str:
    """'gpu', 'tpu', 'cpu', ...: q's platform when it is a concrete array, else jax's default backend."""
    platform = None
    if isinstance(q, jax.Array) and not isinstance(q, jax.core.Tracer):
        try:
            platform = next(iter(q.devices())).platform
        except Exception:  # an array without devices (e.g. abstract): use the default backend
            platform = None
    platform = platform or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def _pow2(n: int) -> int:
    return max(_MIN_DIM, 1 << max(0, int(n) - 1).bit_length())


def _config(d, K, scale, causal, rel_k, rel_v, mask, platform):
    """The kernels' static config and padded sizes (Tp, Sp, Hp, Rp)."""
    Hp, Rp = _pow2(d.H), _pow2(2 * K + 1)
    bt = min(BLOCK_T, _pow2(d.T))
    bs = min(BLOCK_S, _pow2(d.S))
    if Hp > _WIDE_HEAD:
        bt, bs = min(bt, _WIDE_HEAD_TILE), min(bs, _WIDE_HEAD_TILE)
    if platform == "tpu":  # Mosaic tiles: key tiles span whole 128-lane rows (of the mask in the column pass)
        bt, bs = max(bt, _TPU_TILE), max(bs, _TPU_TILE)
    Tp, Sp = -(-d.T // bt) * bt, -(-d.S // bs) * bs
    mask_shape = None
    if mask is not None:
        m = (1,) * (4 - mask.ndim) + tuple(mask.shape)
        mask_shape = (m[0], m[1], Tp if m[2] > 1 else 1, Sp if m[3] > 1 else 1)
    cfg = kernels._Config(T=d.T, S=d.S, K=K, scale=scale, causal=bool(causal), block_t=bt, block_s=bs,
                         keys=rel_k is not None, values=rel_v is not None, mask_shape=mask_shape,
                         platform=platform, num_warps=_WARPS_SMALL_H if Hp <= 64 else _WARPS_LARGE_H,
                         planted_bug=_PLANTED_BUG)
    return cfg, (Tp, Sp, Hp, Rp)


def _tile_mask(mask, Tp, Sp):
    """The user's mask as int8 [B|1, N|1, T|1, S|1], padded to whole tiles with False (never expanded)."""
    if mask is None:
        return None
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)).astype(jnp.int8)
    pad_t = Tp - m.shape[2] if m.shape[2] > 1 else 0
    pad_s = Sp - m.shape[3] if m.shape[3] > 1 else 0
    return jnp.pad(m, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, meta, q, k, v, qa, av, mask):
    """The kernel core on the padded layout: q [B, N, Tp, Hp], k, v [B, N, Sp, Hp], qa [B, N, Tp, Rp]
    (float32, scaled) or None, av [N or 1, Rp, Hp] or None, mask int8 tiles or None -> [B, N, Tp, Hp]."""
    return _fused_fwd(cfg, meta, q, k, v, qa, av, mask)[0]


def _fused_fwd(cfg, meta, q, k, v, qa, av, mask):
    out, lse, c = kernels._forward(cfg, meta, q, k, v, qa, 1 if av is None else av.shape[1], mask)
    if av is not None:  # the value term C @ A^V: one GEMM after the kernel (float32)
        shared = av.shape[0] == 1
        table = (av[0] if shared else av).astype(jnp.float32)
        out = out + jnp.einsum(f"BNTR,{'RH' if shared else 'NRH'}->BNTH", c, table, precision=_HIGHEST)
    return out.astype(q.dtype), (meta, q, k, v, qa, av, mask, out, lse, c)


def _fused_bwd(cfg, res, g):
    meta, q, k, v, qa, av, mask, out, lse, c = res
    g32 = g.astype(jnp.float32)
    dlt = jnp.einsum("BNTH,BNTH->BNT", g32, out, precision=_HIGHEST)[..., None]  # out: float32
    gv, dav = None, None
    if cfg.values:
        av_heads = jnp.broadcast_to(av, (q.shape[1], *av.shape[1:])).astype(jnp.float32)
        gv = jnp.einsum("BNTH,NRH->BNTR", g32, av_heads, precision=_HIGHEST)  # [B, N, Tp, Rp]
        dav = jnp.einsum("BNTR,BNTH->NRH", c, g32, precision=_HIGHEST)  # C^T dO
        dav = dav.sum(0, keepdims=True) if av.shape[0] == 1 else dav
        dav = dav.astype(av.dtype)
    dq, e, dk, dv = kernels._backward(cfg, meta, q, k, v, qa, gv, mask, lse, dlt, g)
    return None, dq.astype(q.dtype), dk, dv, (e if cfg.keys else None), dav, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _check(q, k, v, rel_k, rel_v, K, q_offset, mask, key_lengths) -> _spec.Dims:
    """Shapes and dtypes, with errors naming the argument."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16 for the fused kernel, got dtype {q.dtype}")
    d = _spec.check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    named = [("q", q.dtype), ("k", k.dtype), ("v", v.dtype)]
    named += [(n, t.dtype) for n, t in (("rel_k", rel_k), ("rel_v", rel_v)) if t is not None]
    _spec.check_float_dtypes(named, lambda dt: jnp.issubdtype(dt, jnp.floating))
    _spec.check_positions(d.T, d.S, K)
    for name, table in (("rel_k", rel_k), ("rel_v", rel_v)):
        if table is not None:
            _spec.table_layout(name, tuple(table.shape), d)
            if table.shape[0] != 2 * K + 1:
                raise ValueError(f"{name} must have R = 2 * max_distance + 1 = {2 * K + 1} rows for "
                                 f"max_distance={K}, got shape {_spec.fmt(table.shape)}")
    if q_offset is not None and not isinstance(q_offset, int):
        if jnp.ndim(q_offset) != 0 or not jnp.issubdtype(jnp.result_type(q_offset), jnp.integer):
            raise TypeError(f"q_offset must be an int or a 0-d integer array, got {q_offset!r}")
    if mask is not None:
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be a bool array (True = may attend), got dtype {mask.dtype}")
        _spec.check_mask_shape(tuple(mask.shape), d)
    if key_lengths is not None:
        if not jnp.issubdtype(jnp.result_type(key_lengths), jnp.integer):
            raise TypeError(f"key_lengths must be an integer array [B], got dtype {jnp.result_type(key_lengths)}")
        if tuple(jnp.shape(key_lengths)) != (d.B,):
            raise ValueError(f"key_lengths must be int [B] = [{d.B}], got shape {_spec.fmt(jnp.shape(key_lengths))}")
    return d
