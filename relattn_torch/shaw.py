"""Exact Shaw attention: fused attention on the clipped tails, O(T*k) work on the band (PyTorch).

Why this twin differs: torch has a fused attention kernel on CPU and XLA has none, so this
path runs the tails in that kernel and only the band by hand, never holding [B, N, T, S]
logits; the plan of calls and band blocks lives in the private ``_shaw_plan.py``, the band's
arithmetic in ``_shaw_band.py``. The kernel
takes no dropout and, as a mask, only a key-padding one (an additive [B, 1, 1, S] bias; the band masks
the same keys), only CPU float32/float64 tensors and an int q_offset, so
``choice.py`` sends other calls elsewhere. The JAX twin maps the clipped ids through one
expand / reduce pair over the full logits, which takes any mask, dtype and traced q_offset.
Both compute exactly the same function.

Dimension legend as in ``attention.py``: B T S N H R. U below is one [B, T, N, H] buffer.

Shaw ids r_ij = clip(j - i - q_offset, -K, K) + K (K = max_distance, R = 2K + 1) split each
query row into three key sets, d = j - i - q_offset:
    left tail   d <= -K          a_ij = table[0]       (one row for the whole tail)
    band        -K < d < K       a_ij = table[d + K]   (2K - 1 diagonals)
    right tail  d >= max(K, 1)   a_ij = table[2K]
On a tail the key term is one table row and so is the value term, so a tail is plain attention
with keys k + a^K_tail: torch's fused CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``
and its backward) runs it, reading strided [B, N, L, H] views of our [B, L, N, H] tensors and
skipping the masked blocks of a causal call. The band runs in blocks of ``_BAND_BLOCK`` query
rows, each against a window of P * block keys (P = ceil((block + 2K - 2) / block)), by batched
matmuls; its key / value table terms go through a skewed strided view of a block's
[block, P * block] logits (entry [u, u + r] is the band entry of table row r + 1; no gather, no
index tensor).

Chunks (``_shaw_plan.Plan``). The backward cuts the query rows into chunks of C rows,
C * B * N * H about ``_CHUNK_ELEMENTS`` (C a multiple of ``block``; C = 1024 for B N H = 2 8 64,
so 2 chunks at T = 2048, 8 at T = 8192); the forward, which keeps fewer buffers per row, uses
chunks of 2C. For rows [r0, r1) a tail is a rectangle of keys that every row sees plus a
triangle of at most C^2 / 2 entries (``_shaw_plan.tail_calls``): the left triangle is a top-left
causal call; the right one, mirrored, a causal call on reversed copies of only that triangle's
rows and keys. The backward also cuts
every rectangle into tiles of at most C keys.

Forward, per chunk: the band writes its output and log-sum-exp into the chunk's rows of z
[B, T, N, H] (the output buffer) and lse [B, N, T]; then each tail call's (o + a^V_tail, lse) is
merged in by log-sum-exp (o's weight sigmoid(lse_o - lse), a lerp). Saved for the backward: the
inputs, z and lse; nothing per piece.

Backward, per chunk: each tail call runs the fused backward with keys k + a^K_tail (so its dq
includes the key-table term and its dk, summed, is d table_K[tail]), the merged lse, and out =
z - a^V_tail (so the kernel's rowsum(dO * O) is dz . (z - a^V_tail), the softmax-Jacobian term
of the full attention; the summed dv is d table_V[tail]); its dq / dk / dv are added into dq, dk,
dv, which are allocated once in the layout of q, k, v (autograd takes them without a copy). The
band recomputes its probabilities from lse, with D = rowsum(dz * z).

Memory. Beyond z, lse and (backward) dq, dk, dv, every buffer is per chunk: at most about 7 of
[B, N, C, H] (a P * block window counts P): k + a^K for one tile, z - a^V for the chunk, the
kernel's dq / dk / dv and its own scratch, the reversed copies of one triangle, the band's key
windows, logits and gradients. At B, S, N, H = 2, 8192, 8, 64 that is under 1 U on top of the 6 U
that any attention backward holds (output, cotangent, dz, dq, dk, dv). No [B, N, T, S] tensor
exists in either direction; memory is linear in T and S.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import _spec, buckets
from ._flash_op import flash, flash_bwd
from ._shaw_band import band_backward, band_forward
from ._shaw_plan import Band, Plan
from .einsum import AttentionArgs

_BAND_BLOCK = 32  # query rows per band block
_FORWARD_CHUNKS = 2  # forward chunk = this many backward chunks (fewer temporaries per row)
_CHUNK_ELEMENTS = 1 << 20  # about B * N * H * (query rows per backward chunk); see the module docstring


def shaw_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs) -> torch.Tensor:
    """Shaw attention with implied ids clip(j - i - q_offset, +-max_distance) + max_distance, banded.

    A bucket scheme (``args.scheme``) runs as the Shaw form of clip K = ``buckets.shaw_width`` with
    tables ``table[buckets.shaw_rows(scheme, K)]``: exact, since every id is the bucket of the
    clipped distance. Grouped k, v (N_kv heads) are repeated to N heads first (an explicit
    [B, S, N, H] copy each: the fused CPU kernel takes equal head counts).

    Args:
        q: queries [B, T, N, H] on CPU, float32, float64, bfloat16 or float16 (half inputs run
            in float32: the fused kernel's per-key gradients in half precision would carry
            their rounding into the table gradients, summed over every key of a tail).
        k: keys [B, S, N_kv, H] (N_kv divides N).
        v: values [B, S, N_kv, H].
        args: the checked arguments of the call, in the Shaw form (or a scheme): tables ``rel_k`` / ``rel_v``
            [R, H] or [R, N, H] with R = 2 * max_distance + 1, an int ``q_offset``, no mask or a
            key-padding mask (one that varies only along B and S, e.g. [B, 1, 1, S]), no
            dropout and, when causal, q_offset + max(max_distance, 1) > S - T (``choice.py``
            sends other calls to another path).

    Returns:
        [B, T, N, H]; a query that sees no key returns 0.
    """
    B, T, N, H = q.shape
    S = k.shape[1]
    if k.shape[2] != N:  # grouped heads: repeated here (the fused CPU kernel takes equal heads; autograd sums back)
        k, v = (t.repeat_interleave(N // k.shape[2], dim=2) for t in (k, v))
    if args.scheme is not None:
        args = _as_shaw(args, T, S)
    if (args.mask is not None and not _spec.is_key_padding(tuple(args.mask.shape), T, N)) or args.dropout_p > 0.0 \
            or args.max_distance is None:
        raise ValueError("the banded Shaw path takes max_distance, no mask or a key-padding mask, and no dropout")
    valid = None if args.mask is None else args.mask.reshape(-1, args.mask.shape[-1]).expand(B, S).contiguous()
    if q.dtype in (torch.float16, torch.bfloat16):  # float32 compute, half storage; autograd casts the gradients
        up = lambda t: None if t is None else t.float()  # noqa: E731
        return shaw_attention(up(q), up(k), up(v), replace(args, rel_k=up(args.rel_k), rel_v=up(args.rel_v))).to(q.dtype)
    scale = args.scale
    if scale <= 0.0:  # torch's flash kernel scales its masked -inf logits: 0 * -inf is NaN, -1 * -inf is +inf
        q, scale = q * scale, 1.0
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * N * H) // _BAND_BLOCK) * _BAND_BLOCK  # backward rows per chunk
    plan = Plan(T, S, args.q_offset, args.max_distance, S - T if args.is_causal else None, _BAND_BLOCK, chunk)
    return _ShawFunction.apply(q, k, v, args.rel_k, args.rel_v, plan, scale, valid)


def _as_shaw(args: AttentionArgs, T: int, S: int) -> AttentionArgs:
    """A bucket scheme's call as the Shaw form: clip K = shaw_width (lossless for these sizes and this
    q_offset) and the tables expanded to table[shaw_rows(scheme, K)] (the gather sums their gradients back)."""
    K = buckets.shaw_width(args.scheme, T, S, args.q_offset)
    rows = buckets.shaw_rows(args.scheme, K, device=args.rel_k.device if args.rel_k is not None else None)
    take = lambda t: None if t is None else t[rows]  # noqa: E731
    return replace(args, rel_k=take(args.rel_k), rel_v=take(args.rel_v), max_distance=K, scheme=None)


@dataclass(frozen=True)
class _Inputs:
    """One call's q, k, v as [B, N, L, H] views of their [B, L, N, H] storage, k itself (the tails
    read it in its own layout), the tables as per-head [N, R, H] views (or None), the scale, and
    a key-padding mask: ``valid`` [B, S] bool and ``bias`` [B, 1, 1, S] (0 or -inf, the fused
    kernel's additive mask), or None."""

    qt: torch.Tensor
    kt: torch.Tensor
    vt: torch.Tensor
    k: torch.Tensor
    rk: torch.Tensor | None
    rv: torch.Tensor | None
    scale: float
    valid: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def of(cls, q, k, v, rel_k, rel_v, scale, valid=None):
        N = q.shape[2]
        rk = None if rel_k is None else _heads(rel_k, N)
        rv = None if rel_v is None else _heads(rel_v, N)
        bias = None if valid is None else q.new_zeros(valid.shape).masked_fill_(~valid, -torch.inf)[:, None, None]
        return cls(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), k, rk, rv, scale, valid, bias)


@dataclass(frozen=True)
class _Output:
    """The forward's output z and the cotangent dz as [B, N, T, H] views, and the finite lse [B, N, T]."""

    zt: torch.Tensor
    dzt: torch.Tensor
    lse: torch.Tensor


@dataclass(frozen=True)
class _Grads:
    """The gradients being summed: dq, dk, dv in the layout of q, k, v (autograd takes them without a
    copy), their [B, N, L, H] views, and the per-head table gradients [N, R, H] (or None)."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    drk: torch.Tensor | None
    drv: torch.Tensor | None

    @classmethod
    def zeros(cls, q, k, v, x: _Inputs, R: int):
        dq, dk, dv = (torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        N, H = q.shape[2], q.shape[3]
        drk = None if x.rk is None else q.new_zeros(N, R, H)
        drv = None if x.rv is None else q.new_zeros(N, R, H)
        return cls(dq, dk, dv, drk, drv)

    @property
    def views(self):
        return self.dq.transpose(1, 2), self.dk.transpose(1, 2), self.dv.transpose(1, 2)


def _kernel_ready(x):
    """x [B, L, N, H] with unit stride on H and row stride >= H, as the fused kernel's gemm reads it."""
    if x.stride(-1) == 1 and x.stride(1) >= x.shape[-1]:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _tail_keys(k, s0, s1, rk, c):
    """Keys k + a^K_tail of call c over [s0, s1) as [B, N, keys, H] (reversed if c.flip); a view if no key table."""
    x = k[:, s0:s1]
    if c.flip:
        x = x.flip(1)
        if rk is not None:
            x += rk[:, c.row]
    elif rk is not None:
        x = x + rk[:, c.row]
    return x.transpose(1, 2)


def _take(x, lo, hi, flip):
    """x[:, :, lo:hi] of a [B, N, L, ...] tensor, reversed along L if ``flip``."""
    x = x[:, :, lo:hi]
    return x.flip(2) if flip else x


def _heads(t, N):
    """Table [R, H] or [R, N, H] -> [N, R, H] (a view)."""
    return t[None].expand(N, *t.shape) if t.dim() == 2 else t.transpose(0, 1)


class _ShawFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_k, rel_v, plan, scale, valid):
        q, k, v = (_kernel_ready(t) for t in (q, k, v))
        x = _Inputs.of(q, k, v, rel_k, rel_v, scale, valid)
        B, T, N, H = q.shape
        band_on = plan.K > 0
        z = q.new_empty(B, T, N, H) if band_on else q.new_zeros(B, T, N, H)
        zt = z.transpose(1, 2)
        lse = q.new_empty(B, N, T) if band_on else q.new_full((B, N, T), -torch.inf)
        for r0, r1 in plan.chunks(_FORWARD_CHUNKS * plan.chunk):
            acc, m = zt[:, :, r0:r1], lse[:, :, r0:r1]
            if band_on:
                band_forward(Band(plan, r0, r1), x, acc, m)
            _tails_forward(plan, (r0, r1), x, acc, m)
        ctx.save_for_backward(q, k, v, rel_k, rel_v, z, lse, valid)
        ctx.plan, ctx.scale = plan, scale
        return z

    @staticmethod
    def backward(ctx, dz):
        q, k, v, rel_k, rel_v, z, lse, valid = ctx.saved_tensors
        plan = ctx.plan
        x = _Inputs.of(q, k, v, rel_k, rel_v, ctx.scale, valid)
        o = _Output(z.transpose(1, 2), _kernel_ready(dz).transpose(1, 2), torch.where(torch.isfinite(lse), lse, 0.0))
        g = _Grads.zeros(q, k, v, x, 2 * plan.K + 1)
        for r0, r1 in plan.chunks(plan.chunk):
            _tails_backward(plan, (r0, r1), x, o, g)
            if plan.K > 0:
                band_backward(Band(plan, r0, r1), x, o, g)
        drk = None if g.drk is None else (g.drk.sum(0) if rel_k.dim() == 2 else g.drk.transpose(0, 1))
        drv = None if g.drv is None else (g.drv.sum(0) if rel_v.dim() == 2 else g.drv.transpose(0, 1))
        return g.dq, g.dk, g.dv, drk, drv, None, None, None


def _tails_forward(plan, rows, x: _Inputs, acc, m):
    """Merge every tail call of query rows [r0, r1) into acc [B, N, n, H] and m [B, N, n] by log-sum-exp."""
    r0, _ = rows
    for c in plan.calls(*rows):
        (lo, hi), (s0, s1) = c.rows, c.keys
        ck = _tail_keys(x.k, s0, s1, x.rk, c)
        o, l = flash(_take(x.qt, lo, hi, c.flip), ck, _take(x.vt, s0, s1, c.flip), 0.0, c.causal,
                      attn_mask=_key_bias(x, s0, s1, c.flip), scale=x.scale)
        del ck
        if x.valid is not None:  # the kernel gives a row with no valid key o = 0 and lse = 0: make it -inf
            l.masked_fill_(~_rows_seeing(x.valid, (s0, s1), c.flip, c.causal, hi - lo), -torch.inf)
        if c.flip:
            o, l = o.flip(2), l.flip(2)
        if x.rv is not None:
            o += x.rv[:, c.row, None]
        _merge(acc[:, :, lo - r0 : hi - r0], m[:, :, lo - r0 : hi - r0], o, l)
        del o, l


def _tails_backward(plan, rows, x: _Inputs, o: _Output, g: _Grads):
    """Add the tails' share of query rows [r0, r1) into ``g``: one fused backward per call (tiled)."""
    r0, r1 = rows
    dqt, dkt, dvt = g.views
    out_row, out = None, o.zt[:, :, r0:r1]  # z - a^V of the tail being run, over the chunk
    for c in plan.calls(r0, r1, tile=plan.chunk):
        (lo, hi), (s0, s1), row = c.rows, c.keys, c.row
        if c.flip:  # reversed copies of this triangle's rows and keys only
            if x.rv is not None:
                out_row, out = None, None
            cout = o.zt[:, :, lo:hi].flip(2)
            if x.rv is not None:
                cout -= x.rv[:, row, None]
        else:
            if x.rv is not None and out_row != row:
                out_row, out = row, o.zt[:, :, r0:r1] - x.rv[:, row, None]
            cout = out[:, :, lo - r0 : hi - r0]
        ck = _tail_keys(x.k, s0, s1, x.rk, c)
        d = flash_bwd(_take(o.dzt, lo, hi, c.flip), _take(x.qt, lo, hi, c.flip), ck, _take(x.vt, s0, s1, c.flip),
                       cout, _take(o.lse, lo, hi, c.flip), 0.0, c.causal, attn_mask=_key_bias(x, s0, s1, c.flip),
                       scale=x.scale)
        del ck, cout
        if g.drk is not None:
            g.drk[:, row].add_(d[1].sum((0, 2)))
        if g.drv is not None:
            g.drv[:, row].add_(d[2].sum((0, 2)))
        for t, (a0, a1), dt in ((dqt, c.rows, d[0]), (dkt, c.keys, d[1]), (dvt, c.keys, d[2])):
            t[:, :, a0:a1].add_(dt.flip(2) if c.flip else dt)
        del d, dt


def _key_bias(x: _Inputs, s0, s1, flip):
    """The additive key-padding mask of keys [s0, s1) as [B, 1, 1, keys] (reversed if ``flip``), or None."""
    if x.bias is None:
        return None
    bias = x.bias[..., s0:s1]
    return bias.flip(-1) if flip else bias


def _rows_seeing(valid, keys, flip, causal, n_rows):
    """[B, 1, n_rows]: whether each row of a fused call (in call order) sees a valid key.

    A rectangle call's rows all see keys [s0, s1); in a top-left causal call row u sees the
    first u + 1 of them."""
    seen = valid[:, keys[0] : keys[1]]
    seen = seen.flip(1) if flip else seen
    if not causal:
        return seen.any(-1)[:, None, None].expand(-1, 1, n_rows)
    upto = seen.to(torch.uint8).cummax(-1).values.bool()  # [B, keys]: a valid key among the first u + 1
    last = torch.arange(n_rows, device=valid.device).clamp_max(seen.shape[1] - 1)
    return upto[:, last][:, None]


def _merge(acc, m, o, l):
    """acc, m <- the log-sum-exp merge of (acc, m) and (o, l): acc [B, N, n, H] (finite), m [B, N, n], l [B, N, n]."""
    w = torch.sigmoid(l - m).nan_to_num_(0.0)  # weight of o: e^l / (e^m + e^l); 1 where m = -inf, 0 where l = -inf
    acc.lerp_(o, w[..., None])
    torch.logaddexp(m, l, out=m)
