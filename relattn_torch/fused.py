"""Fused Shaw relative attention: one Triton kernel pass forward, two backward (PyTorch).

Dimension legend (shared with ``relattn_jax/fused.py``):
    B batch, T query length, S key length, N heads, H head dim, R relation ids.

Ids r_ij = clip(j - i - q_offset, -K, K) + K with K = max_distance and R = 2K + 1. The forward walks
key tiles of ``BLOCK_S`` columns for each block of ``BLOCK_T`` query rows with an online softmax:
logits c * (q_i . k_j + qa_i[r_ij]), qa = q . A^K [B, N, T, R] made by one GEMM before the kernel and
gathered only in tiles that cross the band |j - i - q_offset| < K. Kept per row: max, sum, the output
accumulator and the masses of the clipped buckets 0 and 2K (rescaled like the accumulator); a band
bucket holds one key per row, so its mass exp(logit - lse) comes from the logit the kernel writes.
The value term C @ A^V is added to the float32 output after the kernel. Saved for the backward:
lse and the bucket masses C [B, N, T, R]. The backward recomputes p from q, k, qa and lse: a row
pass makes dq and the bucket sums E of ds, a column pass makes dk and dv, and the table gradients
c * E^T Q and C^T dO are plain reductions. No [B, N, T, S] tensor is ever written and no atomics
are used. The kernels live in ``_fused_kernels.py``; docs/fused-kernels-torch.md has the measured
numbers.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections import namedtuple

import torch

from . import _spec

_Config = namedtuple("Config", "BLOCK_T BLOCK_S num_warps num_stages H")
BLOCK_T = 32  # query rows per program
BLOCK_S = 32  # key columns per tile
# Every launch configuration, by padded head dim H (a power of two, 16 to 256). Chosen from sm_90
# and sm_80 compiles with every feature on (docs/fused-kernels-torch.md has the table): larger
# tiles spill registers in the backward row pass.
_CONFIGS = (
    _Config(BLOCK_T, BLOCK_S, 4, 2, 16),
    _Config(BLOCK_T, BLOCK_S, 8, 2, 32),
    _Config(BLOCK_T, BLOCK_S, 8, 2, 64),
    _Config(BLOCK_T, BLOCK_S, 8, 2, 128),
    _Config(BLOCK_T, BLOCK_S, 8, 1, 256),
)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable(q: torch.Tensor) -> str | None:
    """None when the kernel can run on q's device, else a one-line reason.

    Args:
        q: any tensor on the device in question.

    Returns:
        None if triton imports and q is a CUDA tensor or TRITON_INTERPRET=1 is set; else the reason.
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return _device_reason(q, _interpret_env())


def fused_attention(q, k, v, rel_k=None, rel_v=None, *, max_distance, q_offset=None, is_causal=False,
                    scale=None, mask=None, key_lengths=None, interpret=None) -> torch.Tensor:
    """Shaw relative attention in fused Triton kernels; equals ``relative_attention`` with ``max_distance``.

    Args:
        q: queries [B, T, N, H], float32, float16 or bfloat16.
        k: keys [B, S, N, H], q's dtype.
        v: values [B, S, N, H], q's dtype.
        rel_k: key table A^K [R, H] (shared by heads) or [R, N, H], R = 2 * max_distance + 1, or None.
        rel_v: value table A^V, same forms as ``rel_k``, or None. With neither table the kernel is
            plain flash attention (masks and causality still apply).
        max_distance: K; ids are clip(j - i - q_offset, -K, K) + K.
        q_offset: position of query 0 among the keys, a Python int or a 0-d integer tensor (read on
            the device, never synchronised); default S - T.
        is_causal: key j is visible to query i iff j <= i + (S - T) (bottom-right aligned).
        scale: logit scale; default 1 / sqrt(H).
        mask: bool, broadcastable to [B, N, T, S]; True means the query may attend the key. Read
            tile by tile through its strides, never expanded in memory.
        key_lengths: integer [B]; key j is visible iff j < key_lengths[b] (copied to q's device).
        interpret: run Triton's CPU interpreter; None means iff the environment has TRITON_INTERPRET=1.
            It must match how triton was first imported (Triton reads the variable then).

    Returns:
        [B, T, N, H] in q's dtype (softmax and sums in float32). A query that sees no key returns
        exactly 0, with zero gradients.
    """
    d = _check(q, k, v, rel_k, rel_v, max_distance, q_offset, mask, key_lengths)
    interpret = _interpret_env() if interpret is None else bool(interpret)
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("fused_attention needs triton: triton is not installed")
    why = _device_reason(q, interpret)
    if why is not None:
        raise RuntimeError(f"fused_attention cannot run here: {why}")
    launch = _Launch(
        K=max_distance, scale=d.H**-0.5 if scale is None else float(scale), is_causal=bool(is_causal),
        interpret=interpret, config=_config(_padded(d.H), q.dtype),
    )
    qoff = _offset_tensor(q_offset, d, q.device)
    kl = None if key_lengths is None else key_lengths.to(device=q.device, dtype=torch.int32).contiguous()
    return _FusedShaw.apply(q, k, v, rel_k, rel_v, qoff, mask, kl, launch)


_Launch = namedtuple("_Launch", "K scale is_causal interpret config")


class _FusedShaw(torch.autograd.Function):
    """Gradients for q, k, v, rel_k and rel_v; the mask, key lengths and offset have none."""

    @staticmethod
    def forward(ctx, q, k, v, rel_k, rel_v, qoff, mask, kl, launch):
        q, k, v = (x.contiguous() for x in (q, k, v))
        qa = None if rel_k is None else _table_product(q, rel_k)  # [B, N, T, R]
        o, lse, c = _forward(q, k, v, qa, rel_v is not None, qoff, mask, kl, launch)
        if rel_v is not None:
            o = o + torch.einsum(f"BNTR,{_layout(rel_v)}->BTNH", c, rel_v.float())
        ctx.save_for_backward(q, k, v, rel_k, rel_v, qa, c, lse, o, qoff, mask, kl)
        ctx.launch = launch
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, rel_k, rel_v, qa, c, lse, o, qoff, mask, kl = ctx.saved_tensors
        launch = ctx.launch
        dout32 = dout.float()
        delta = torch.einsum("BTNH,BTNH->BNT", dout32, o).contiguous()  # [B, N, T]
        gv = None if rel_v is None else _table_product(dout32, rel_v)  # [B, N, T, R]
        dq, e, dk, dv = _backward(q, k, v, dout.to(q.dtype).contiguous(), qa, gv, lse, delta, qoff, mask, kl, launch)
        d_rel_k = d_rel_v = None
        if rel_k is not None:
            dq = dq + launch.scale * torch.einsum(f"BNTR,{_layout(rel_k)}->BTNH", e, rel_k.float())
            d_rel_k = (launch.scale * torch.einsum(f"BNTR,BTNH->{_layout(rel_k)}", e, q.float())).to(rel_k.dtype)
        if rel_v is not None:
            d_rel_v = torch.einsum(f"BNTR,BTNH->{_layout(rel_v)}", c, dout32).to(rel_v.dtype)
        return dq.to(q.dtype), dk, dv, d_rel_k, d_rel_v, None, None, None, None


def _forward(q, k, v, qa, want_c, qoff, mask, kl, launch):
    """Launch the forward kernel: O [B, T, N, H] float32, lse [B, N, T], C [B, N, T, R] or None."""
    B, T, N, H = q.shape
    K, cfg = launch.K, launch.config
    R = 2 * K + 1
    f32 = dict(device=q.device, dtype=torch.float32)
    o = torch.empty(B, T, N, H, **f32)
    lse = torch.empty(B, N, T, **f32)
    c = torch.full((B, N, T, R), float("-inf"), **f32) if want_c else None
    if B * N * T == 0:
        return o.zero_(), lse.fill_(float("-inf")), None if c is None else c.zero_()
    args = _common_args(q, k, v, qa, None, mask, kl, qoff, launch)
    kernels = _kernels(launch.interpret)
    kernels._fwd_kernel[(_cdiv(T, cfg.BLOCK_T), B * N)](
        q, k, v, _or(qa, qoff), args["mask"], _or(kl, qoff), qoff, o, lse, _or(c, qoff), *args["strides"],
        T, k.shape[1], N, launch.scale, HAS_C=want_c, **args["constexprs"])
    if want_c:  # band buckets hold logits: their mass is exp(logit - lse); unseen rows get 0
        seen = torch.isfinite(lse)[..., None]  # [B, N, T, 1]
        band = c[..., 1:R - 1]
        c[..., 1:R - 1] = torch.where(seen, torch.exp(band - torch.where(seen, lse[..., None], 0.0)), 0.0)
    return o, lse, c


def _backward(q, k, v, dout, qa, gv, lse, delta, qoff, mask, kl, launch):
    """Row pass (dq without the table term, E) and column pass (dk, dv)."""
    B, T, N, H = q.shape
    S, cfg = k.shape[1], launch.config
    dq = torch.zeros(B, T, N, H, device=q.device, dtype=torch.float32)
    e = None if qa is None else torch.zeros_like(qa)  # [B, N, T, R]
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    args = _common_args(q, k, v, qa, gv, mask, kl, qoff, launch)
    kernels = _kernels(launch.interpret)
    shared = (q, k, v, dout, _or(qa, qoff), _or(gv, qoff), lse, delta, args["mask"], _or(kl, qoff), qoff)
    tail = (*args["strides"], T, S, N, launch.scale)
    if B * N * T > 0 and S > 0:
        kernels._bwd_rows_kernel[(_cdiv(T, cfg.BLOCK_T), B * N)](
            *shared, dq, _or(e, qoff), *tail, HAS_GV=gv is not None, **args["constexprs"])
        kernels._bwd_cols_kernel[(_cdiv(S, cfg.BLOCK_S), B * N)](
            *shared, dk, dv, *tail, HAS_GV=gv is not None, **args["constexprs"])
    return dq, e, dk, dv


def _common_args(q, k, v, qa, gv, mask, kl, qoff, launch):
    """Strides of q-like, k-like and mask tensors, the mask view, and the shared constexprs."""
    B, T, N, H = q.shape
    cfg = launch.config
    if mask is None:
        mask_view, mask_strides = qoff, (0, 0, 0, 0)
    else:  # a broadcast view: stride 0 on size-1 dims, nothing materialised
        full = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(B, N, T, k.shape[1])
        mask_view, mask_strides = full.view(torch.uint8), full.stride()
    constexprs = dict(
        H=H, HP=cfg.H, R=2 * launch.K + 1, K=launch.K, HAS_QA=qa is not None, HAS_MASK=mask is not None,
        HAS_KL=kl is not None, IS_CAUSAL=launch.is_causal, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_T=cfg.BLOCK_T, BLOCK_S=cfg.BLOCK_S, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    strides = (*q.stride()[:3], *k.stride()[:3], *mask_strides)
    return dict(mask=mask_view, strides=strides, constexprs=constexprs)


def _check(q, k, v, rel_k, rel_v, max_distance, q_offset, mask, key_lengths) -> _spec.Dims:
    """Shapes, dtypes and devices of the arguments, with errors that name the argument."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"fused_attention supports float32, float16 and bfloat16; q has dtype {q.dtype}")
    named = [("q", q), ("k", k), ("v", v), ("rel_k", rel_k), ("rel_v", rel_v)]
    named = [(name, x) for name, x in named if x is not None]
    _spec.check_float_dtypes([(name, x.dtype) for name, x in named], lambda dt: dt.is_floating_point)
    d = _spec.check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    if rel_k is None and rel_v is None:  # plain attention; max_distance only has to be valid
        _spec.check_positions(d.T, d.S, max_distance)
    else:
        _spec.check_shaw(_shape(rel_k), _shape(rel_v), False, max_distance, q_offset is not None, d)
    if _padded(d.H) > max(c.H for c in _CONFIGS):
        raise ValueError(f"fused_attention supports head dims H <= {max(c.H for c in _CONFIGS)}, got H = {d.H}")
    # key_lengths and a tensor q_offset are small and may live on the host; they are copied over.
    for name, x in named[1:] + ([("mask", mask)] if mask is not None else []):
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
        _spec.check_mask_shape(tuple(mask.shape), d)
    if key_lengths is not None:
        if not _is_int(key_lengths):
            raise TypeError(f"key_lengths must be an integer tensor, got dtype {key_lengths.dtype}")
        if tuple(key_lengths.shape) != (d.B,):
            raise ValueError(f"key_lengths must be [B] = [{d.B}], got shape {_spec.fmt(key_lengths.shape)}")
    _check_offset(q_offset)
    return d


def _check_offset(q_offset) -> None:
    if q_offset is None or (isinstance(q_offset, int) and not isinstance(q_offset, bool)):
        return
    if not isinstance(q_offset, torch.Tensor) or q_offset.dim() != 0 or not _is_int(q_offset):
        what = f"a tensor of dtype {q_offset.dtype} and shape {_spec.fmt(q_offset.shape)}" if isinstance(
            q_offset, torch.Tensor) else repr(q_offset)
        raise TypeError(f"q_offset must be None, an int or a 0-d integer tensor, got {what}")


def _offset_tensor(q_offset, d, device) -> torch.Tensor:
    """q_offset as a one-element int32 tensor on the device (no host synchronisation)."""
    if q_offset is None:
        q_offset = d.S - d.T
    if isinstance(q_offset, torch.Tensor):
        return q_offset.to(device=device, dtype=torch.int32).reshape(1)
    return torch.tensor([q_offset], dtype=torch.int32, device=device)


def _is_int(x: torch.Tensor) -> bool:
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def _shape(x):
    return None if x is None else tuple(x.shape)


def _table_product(x, table) -> torch.Tensor:
    """x . table_r in float32: [B, T, N, H] with [R, H] or [R, N, H] -> [B, N, T, R]."""
    return torch.einsum(f"BTNH,{_layout(table)}->BNTR", x.float(), table.float()).contiguous()


def _layout(table) -> str:
    return "RH" if table.dim() == 2 else "RNH"


def _or(x, fallback):
    """A stand-in pointer for an argument the kernel does not read (its HAS_* flag is off)."""
    return fallback if x is None else x


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _padded(H: int) -> int:
    """The head dim as the kernels tile it: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (H - 1).bit_length())


def _config(hp: int, dtype: torch.dtype) -> _Config:
    """The launch configuration for a padded head dim."""
    for cfg in _CONFIGS:
        if cfg.H == hp:
            return cfg
    raise ValueError(f"fused_attention supports head dims H <= {max(c.H for c in _CONFIGS)}, got padded H {hp}")


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _device_reason(q, interpret: bool) -> str | None:
    if q.is_cuda or interpret:
        return None
    return (f"q is on {q.device.type}; the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 "
            "for the CPU interpreter")


@functools.cache
def _kernels(interpret: bool):
    """The kernel module; Triton's mode is fixed by TRITON_INTERPRET when triton is first imported."""
    import triton.language.standard as standard

    imported_interpreting = type(standard.sum).__name__ == "InterpretedFunction"
    if interpret != imported_interpreting:
        raise RuntimeError(
            f"fused_attention(interpret={interpret}) needs triton imported "
            f"{'with' if interpret else 'without'} TRITON_INTERPRET=1 set, but it was imported "
            f"{'with' if imported_interpreting else 'without'} it; set the variable before triton's first import"
        )
    from . import _fused_kernels

    return _fused_kernels
