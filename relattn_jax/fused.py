"""Fused relative attention: one Pallas kernel per pass, flash-style (JAX).

Dimension legend as in ``attention.py``: B T S N H R. Twin of ``relattn_torch/fused.py`` (Triton):
same function, arguments, tile names and order of steps.

Any bucket scheme is the Shaw form with clip K = ``buckets.shaw_width`` and expanded tables
``table[shaw_rows(scheme, K)]`` (R = 2K + 1; the gather sits outside the kernels, so jax sums the
tables' gradients back into the scheme's rows). ``max_distance=K`` is ``ShawBuckets(K)`` with its
tables as they are. The relation terms enter the kernels as additive logits made by small GEMMs:
    qa = c q . A^K + b   [B, N, T, R]  (rows: read at r_ij per query)
    ka = c k . A^Q       [B, N, S, R]  (columns: read at r_ij per key)
Forward, per (batch, head, BLOCK_T query rows), over tiles of BLOCK_S keys:
    s = c q k^T + qa[r_ij] + ka[r_ij]
    online softmax: running max m and sum l per row; acc += p v; bucket masses C [BLOCK_T, R] += the
    sums of p per relation id (acc and C rescaled together by exp(m_old - m_new))
    o = acc / l and C / l; lse = m + log l and C are kept for the backward.
Then out = o + C @ A^V, one small GEMM after the kernel (as the torch twin does).
Backward, given dO for out (hence dO for o and dC = dO . A^V for C): D = rowsum(dO * o) +
rowsum(dC * C) (= rowsum(dO * out)); a row pass recomputes p from lse and makes dq and E (row bucket
sums of ds = p (dO v^T + dC[r_ij] - D)); a column pass makes dk, dv and F (column bucket sums of
ds). E and F are the gradients of qa and ka; jax differentiates the GEMMs around the kernel call
(dA^K, db, dA^Q, dA^V and the table parts of dq and dk). Grouped keys and values (N_kv heads):
query head n reads head n // G, and the column pass sums over each group. No [B, N, T, S] array is
written and there are no atomics. Ids come from ``_fused_kernels.bucket``; the kernel bodies
live in ``_fused_kernels.py``, their launches in ``_fused_launch.py``, the relation terms (Shaw
form, QA, KA) in ``_fused_terms.py``.

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
from . import _fused_launch as launch
from . import _fused_terms as terms
from . import _spec, buckets

BLOCK_T = 64  # query rows per tile
BLOCK_S = 64  # keys per tile
_INTERPRET_ENV = "RELATTN_PALLAS_INTERPRET"
_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
_MIN_DIM = 16  # Triton's dot needs every tile dim >= 16; H and R are padded to powers of two >= this
_HIGHEST = jax.lax.Precision.HIGHEST
_TPU_TILE = 128  # lanes of a TPU vector register
# Heads wider than 128: 32 x 32 tiles (the row pass took 272 KiB of shared memory at 64 x 64, H = 256).
_WIDE_HEAD, _WIDE_HEAD_TILE = 128, 32
# Relation tables of >= 256 padded ids (K >= 64; T5's default saturation 91) get the same 32 x 32 tiles:
# the [BLOCK_T, R] and [R, BLOCK_S] tiles then halve. ptxas (sm_90, float32, H = 64, T5 with every
# term, N_kv = 2) counted 4.5 / 3.6 / 39 KB of spill stores (forward / row / column pass) at 64 x 64
# and 1.0 / 0.7 / 3.1 KB at 32 x 32.
_WIDE_R = 256
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


def fused_attention(q, k, v, rel_k=None, rel_v=None, *, rel_q=None, rel_bias=None, scheme=None,
                    max_distance=None, q_offset=None, is_causal=False, scale=None, mask=None, key_lengths=None,
                    interpret=None) -> jax.Array:
    """Relative attention in fused Pallas kernels; equals ``relative_attention`` with the same terms.

    e_ij = scale (q_i.k_j + q_i.a^K[r_ij] + k_j.a^Q[r_ij]) + b[r_ij, n], z_i = sum_j softmax(e)_ij
    (v_j + a^V[r_ij]), with r_ij = scheme.bucket(j - i - q_offset).

    Args:
        q: queries [B, T, N, H]; float32, float16 or bfloat16.
        k: keys [B, S, N_kv, H]; v: values [B, S, N_kv, H]; same dtype as q. N_kv divides N (grouped
            heads: query head n reads key/value head n // (N // N_kv)).
        rel_k, rel_v: key and value tables A^K, A^V [R, H] (shared by heads) or [R, N, H], or None.
        rel_q: query-side table A^Q (the k_j . a^Q term), same forms, or None.
        rel_bias: per-head bias table b [R, N] (added after the scale), or None.
        scheme: a ``buckets`` scheme (ShawBuckets, T5Buckets, DebertaBuckets, BertBuckets); every
            table has R = scheme.num_ids rows. Exactly one of scheme and max_distance.
        max_distance: K >= 0, the Shaw shorthand: ids r_ij = clip(j - i - q_offset, -K, K) + K, R = 2K + 1.
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
    tables = dict(rel_k=rel_k, rel_v=rel_v, rel_q=rel_q, rel_bias=rel_bias)
    d = _check(q, k, v, tables, scheme, max_distance, q_offset, mask, key_lengths)
    if interpret is None:
        interpret = os.environ.get(_INTERPRET_ENV) == "1"
    if not interpret and (reason := unavailable(q)) is not None:
        raise RuntimeError(reason)
    scale = d.H**-0.5 if scale is None else float(scale)
    K, tables = terms.shaw_form(scheme, max_distance, tables, d, q_offset)
    off = d.S - d.T if q_offset is None else q_offset
    lengths = jnp.full((d.B,), d.S, jnp.int32) if key_lengths is None else jnp.asarray(key_lengths, jnp.int32)
    meta = jnp.concatenate([jnp.asarray(off, jnp.int32).reshape(1), lengths])  # [1 + B] int32
    cfg, pads = _config(d, K, scale, is_causal, tables, k.shape[2], mask, "interpret" if interpret else _platform(q))
    Tp, Sp, Hp, Rp = pads

    def layout(x, length):  # [B, L, N, H] -> [B, N, Lp, Hp]
        x = jnp.transpose(x, (0, 2, 1, 3))
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, Hp - d.H)))

    qa = terms.row_terms(q, tables["rel_k"], tables["rel_bias"], scale, Tp, Rp)
    ka = terms.column_terms(k, tables["rel_q"], scale, d.N, Sp, Rp)
    out, c = _fused(cfg, meta, layout(q, Tp), layout(k, Sp), layout(v, Sp), qa, ka, _tile_mask(mask, Tp, Sp))
    if tables["rel_v"] is not None:  # the value term C @ A^V: one GEMM after the kernel (float32)
        av = tables["rel_v"].astype(jnp.float32)
        av = jnp.pad(av, ((0, Rp - av.shape[0]),) + ((0, 0),) * (av.ndim - 2) + ((0, Hp - d.H),))
        out = out + jnp.einsum(f"BNTR,{terms.layout(av)}->BNTH", c, av, precision=_HIGHEST)
    return jnp.transpose(out[:, :, : d.T, : d.H], (0, 2, 1, 3)).astype(q.dtype)


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


def _config(d, K, scale, causal, tables, N_kv, mask, platform):
    """The kernels' static config and padded sizes (Tp, Sp, Hp, Rp); ``tables`` in Shaw form."""
    Hp, Rp = _pow2(d.H), _pow2(2 * K + 1)
    bt = min(BLOCK_T, _pow2(d.T))
    bs = min(BLOCK_S, _pow2(d.S))
    if Hp > _WIDE_HEAD or Rp >= _WIDE_R:
        bt, bs = min(bt, _WIDE_HEAD_TILE), min(bs, _WIDE_HEAD_TILE)
    if platform == "tpu":  # Mosaic tiles: key tiles span whole 128-lane rows (of the mask in the column pass)
        bt, bs = max(bt, _TPU_TILE), max(bs, _TPU_TILE)
    Tp, Sp = -(-d.T // bt) * bt, -(-d.S // bs) * bs
    mask_shape = None
    if mask is not None:
        m = (1,) * (4 - mask.ndim) + tuple(mask.shape)
        mask_shape = (m[0], m[1], Tp if m[2] > 1 else 1, Sp if m[3] > 1 else 1)
    given = {name for name, t in tables.items() if t is not None}
    cfg = kernels._Config(T=d.T, S=d.S, K=K, R=Rp, scale=scale, causal=bool(causal), block_t=bt, block_s=bs,
                          has_qa=bool(given & {"rel_k", "rel_bias"}), has_ka="rel_q" in given,
                          want_c="rel_v" in given, groups=d.N // N_kv, mask_shape=mask_shape,
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
def _fused(cfg, meta, q, k, v, qa, ka, mask):
    """The kernel core on the padded layout: q [B, N, Tp, Hp], k, v [B, N_kv, Sp, Hp], qa [B, N, Tp, Rp]
    and ka [B, N, Rp, Sp] (float32 logit terms) or None, mask int8 tiles or None -> o [B, N, Tp, Hp]
    and the bucket masses C [B, N, Tp, Rp] (R = 1 without ``cfg.want_c``), both float32."""
    return _fused_fwd(cfg, meta, q, k, v, qa, ka, mask)[0]


def _fused_fwd(cfg, meta, q, k, v, qa, ka, mask):
    o, lse, c = launch.forward(cfg, meta, q, k, v, qa, ka, mask)
    return (o, c), (meta, q, k, v, qa, ka, mask, o, lse, c)


def _fused_bwd(cfg, res, cot):
    meta, q, k, v, qa, ka, mask, o, lse, c = res
    do, dc = cot  # float32 [B, N, Tp, Hp] and [B, N, Tp, Rp]
    dlt = jnp.einsum("BNTH,BNTH->BNT", do, o, precision=_HIGHEST)  # D = rowsum(dO * out), by parts:
    if cfg.want_c:
        dlt = dlt + jnp.einsum("BNTR,BNTR->BNT", dc, c, precision=_HIGHEST)  # dC . C = dO . (C @ A^V)
    dq, e, dk, dv, f = launch.backward(cfg, meta, q, k, v, qa, ka, dc if cfg.want_c else None, mask, lse,
                                         dlt[..., None], do.astype(q.dtype))
    return None, dq.astype(q.dtype), dk, dv, e, f, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _check(q, k, v, tables, scheme, K, q_offset, mask, key_lengths) -> _spec.Dims:
    """Shapes and dtypes, with errors naming the argument."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16 for the fused kernel, got dtype {q.dtype}")
    d = _spec.check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    named = [("q", q.dtype), ("k", k.dtype), ("v", v.dtype)]
    named += [(n, t.dtype) for n, t in tables.items() if t is not None]
    _spec.check_float_dtypes(named, lambda dt: jnp.issubdtype(dt, jnp.floating))
    _check_scheme(scheme, K, d)
    rows, what = (2 * K + 1, f"2 * max_distance + 1 = {2 * K + 1} rows for max_distance={K}") if scheme is None \
        else (scheme.num_ids, f"scheme.num_ids = {scheme.num_ids} rows for {scheme!r}")
    for name, table in tables.items():
        if table is None:
            continue
        if name == "rel_bias":
            if table.ndim != 2 or table.shape[1] != d.N:
                raise ValueError(f"rel_bias (per-head bias table) must be [R, N] = [R, {d.N}], "
                                 f"got shape {_spec.fmt(table.shape)}")
        else:
            _spec.table_layout(name, tuple(table.shape), d)
        if table.shape[0] != rows:
            raise ValueError(f"{name} must have R = {what}, got shape {_spec.fmt(table.shape)}")
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


def _check_scheme(scheme, K, d) -> None:
    """Exactly one of scheme= (a ``buckets`` scheme) and max_distance (a valid Shaw clip)."""
    if scheme is None and K is None:
        raise ValueError("fused_attention needs the relation ids: pass scheme= (a buckets scheme) or max_distance")
    if scheme is not None:
        if K is not None:
            raise ValueError("pass either scheme= or max_distance (the Shaw ids, scheme=ShawBuckets(max_distance)), "
                             "not both")
        if not isinstance(scheme, buckets._Scheme):
            raise TypeError(f"scheme must be a relattn_jax.buckets scheme (ShawBuckets, T5Buckets, DebertaBuckets, "
                            f"BertBuckets), got {scheme!r}")
        return
    _spec.check_positions(d.T, d.S, K)
