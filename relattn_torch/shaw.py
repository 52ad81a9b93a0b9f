"""Exact Shaw attention: fused attention on the clipped tails, O(T*k) work on the band (PyTorch).

Dimension legend as in ``attention.py``: B T S N H R. U below is one [B, T, N, H] buffer.

Shaw ids r_ij = clip(j - i - q_offset, -K, K) + K (K = max_distance, R = 2K + 1) split each
query row into three key sets, d = j - i - q_offset:
    left tail   d <= -K          a_ij = table[0]       (one row for the whole tail)
    band        -K < d < K       a_ij = table[d + K]   (2K - 1 diagonals)
    right tail  d >= max(K, 1)   a_ij = table[2K]
On a tail the key term is one table row and so is the value term, so a tail is plain attention
with keys k + a^K_tail: torch's fused CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``
and its backward) runs it, reading strided [B, N, L, H] views of our [B, L, N, H] tensors and
skipping the masked blocks of a causal call. The band runs in blocks of ``block`` query rows, each
against a window of P * block keys (P = ceil((block + 2K - 2) / block)), by batched matmuls; its
key / value table terms go through a skewed strided view of a block's [block, P * block] logits
(entry [u, u + r] is the band entry of table row r + 1; no gather, no index tensor).

Chunks (``_Plan``). The backward cuts the query rows into chunks of C rows, C * B * N * H about
``CHUNK_ELEMENTS`` (C a multiple of ``block``; C = 1024 for B N H = 2 8 64, so 2 chunks at T = 2048,
8 at T = 8192); the forward, which keeps fewer buffers per row, uses chunks of 2C. For rows
[r0, r1) a tail is a rectangle of keys that every row sees plus a triangle of at most C^2 / 2
entries (``tail_calls``): the left triangle is a top-left causal call; the right one, mirrored, a
causal call on reversed copies of only that triangle's rows and keys. The backward also cuts
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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BAND_BLOCK = 32  # query rows per band block
_FORWARD_CHUNKS = 2  # forward chunk = this many backward chunks (fewer temporaries per row)
CHUNK_ELEMENTS = 1 << 20  # about B * N * H * (query rows per backward chunk); see the module docstring
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class _Call:
    """One fused-attention call over natural query rows / keys; ``flip`` runs it on reversed copies."""

    rows: tuple[int, int]
    keys: tuple[int, int]
    causal: bool  # top-left causal in call order (reversed order if flip)
    flip: bool
    row: int  # table row of this tail


def tail_calls(T: int, S: int, q_offset: int, max_distance: int, causal_offset: int | None,
               rows: tuple[int, int] | None = None, tile: int | None = None) -> list[_Call]:
    """The fused calls that cover both tails for query rows ``rows`` (default all).

    ``causal_offset`` is S - T when causal, else None. ``tile``: at most this many keys per
    rectangle call (None: one rectangle per tail). Every call's first row sees at least one key.
    """
    K, R = max_distance, 2 * max_distance + 1
    r0, r1 = (0, T) if rows is None else rows
    left = q_offset - K if causal_offset is None else min(q_offset - K, causal_offset)
    calls = [_Call(r, s, c, False, 0) for r, s, c in _left(r0, r1, S, left, tile)]
    if causal_offset is None:  # key j >= i + q_offset + max(K, 1)  <=>  j' <= i' + right (reversed)
        right = S - T - q_offset - max(K, 1)
        for (a0, a1), (b0, b1), c in _left(T - r1, T - r0, S, right, tile):
            calls.append(_Call((T - a1, T - a0), (S - b1, S - b0), c, c, R - 1))
    return calls


def _left(r0, r1, S, c, tile):
    """(rows, keys, causal) calls in which query r0 <= i < r1 sees exactly keys 0 <= j <= min(i + c, S - 1)."""
    out = []
    if r1 <= r0 or S <= 0:
        return out
    cc = r0 + c  # row r0 sees keys j <= cc
    if cc >= 0:
        e = min(cc + 1, S)  # a rectangle every row sees, tiled
        step = e if tile is None else tile
        out += [((r0, r1), (s, min(s + step, e)), False) for s in range(0, e, step)]
        if e < S and r1 - r0 > 1:  # row r0 + 1 + u sees keys cc + 1 .. cc + 1 + u: top-left causal
            out.append(((r0 + 1, r1), (e, min(S, cc + r1 - r0)), True))
    elif r1 + c > 0:  # rows before i0 = -c see nothing; row i0 + u sees keys 0 .. u
        out.append(((-c, r1), (0, min(S, r1 + c)), True))
    return out


def supports(T, S, q_offset, max_distance, is_causal) -> bool:
    """Whether the banded path covers this case (else the caller falls back)."""
    if not isinstance(q_offset, int) or isinstance(q_offset, bool):
        return False
    return not is_causal or q_offset + max(max_distance, 1) > S - T


def shaw_attention(q, k, v, rel_k, rel_v, *, max_distance: int, q_offset: int, is_causal: bool, scale: float,
                   block: int | None = None):
    """Shaw attention with implied ids clip(j - i - q_offset, +-max_distance) + max_distance.

    Args:
        q: [B, T, N, H]; k, v: [B, S, N, H] (float32 or float64).
        rel_k, rel_v: tables [R, H] or [R, N, H] with R = 2 * max_distance + 1, or None.
        max_distance, q_offset: the Shaw ids (int q_offset).
        is_causal: bottom-right causal, as in ``relative_attention``; needs
            q_offset + max(max_distance, 1) > S - T (see ``supports``).
        scale: logit scale. block: query rows per band block; default ``BAND_BLOCK``.

    Returns:
        [B, T, N, H]; a query that sees no key returns 0.
    """
    B, T, N, H = q.shape
    block = BAND_BLOCK if block is None else block
    plan = _Plan(B * N * H, T, k.shape[1], q_offset, max_distance, k.shape[1] - T if is_causal else None, block)
    return _ShawFunction.apply(q, k, v, rel_k, rel_v, plan, scale)


class _Plan:
    """Chunks of query rows and the band's geometry: block n of b rows meets keys n * b + j_min + [0, P * b)."""

    def __init__(self, BNH, T, S, q_offset, K, causal_offset, block):
        self.T, self.S, self.q_offset, self.K, self.causal_offset = T, S, q_offset, K, causal_offset
        self.b = b = block
        self.chunk = max(1, CHUNK_ELEMENTS // max(1, BNH) // b) * b  # backward rows per chunk
        self.P = max(1, -(-(b + 2 * K - 2) // b))
        self.j_min = q_offset - K + 1  # key of window column 0 in block 0
        self._invalid = None

    def chunks(self, size):
        return [(r0, min(r0 + size, self.T)) for r0 in range(0, self.T, size)]

    def calls(self, r0, r1, tile=None):
        return tail_calls(self.T, self.S, self.q_offset, self.K, self.causal_offset, (r0, r1), tile)

    def invalid(self, device):
        """[T / b, b, P * b] bool: True where a window entry is not a visible band entry (computed once)."""
        if self._invalid is None:
            b, Pb, K = self.b, self.P * self.b, self.K
            u = torch.arange(b, device=device)[:, None]
            w = torch.arange(Pb, device=device)[None, :]
            rel = w - u + 1  # table row; j - i = rel - K + q_offset
            ok = (rel >= 1) & (rel <= 2 * K - 1)
            if self.causal_offset is not None:
                ok &= rel - K + self.q_offset <= self.causal_offset
            blk = torch.arange(-(-self.T // b), device=device)[:, None, None] * b
            j = blk + w + self.j_min
            self._invalid = ~(ok & (blk + u < self.T) & (j >= 0) & (j < self.S))
        return self._invalid


class _Band:
    """The band of query rows [r0, r1) (r0 a multiple of b): nblk blocks, keys [j0, j0 + L)."""

    def __init__(self, plan, r0, r1):
        self.b, self.P, self.K, self.S = plan.b, plan.P, plan.K, plan.S
        self.n, self.nblk = r1 - r0, -(-(r1 - r0) // plan.b)
        self.j0 = r0 + plan.j_min
        self.L = (self.nblk + self.P - 1) * self.b
        self.rows = (r0, r1)
        self.plan = plan

    def invalid(self, device):
        """[nblk, b, P * b] bool: True off the visible band."""
        n0 = self.rows[0] // self.b
        return self.plan.invalid(device)[n0 : n0 + self.nblk]

    def blocks(self, x, scale=None):
        """Chunk rows x [B, N, n, H] as a contiguous [B, N, nblk, b, H] (times ``scale``), zero-padded."""
        B, N, _, H = x.shape
        if torch.compiler.is_compiling():
            # the eager form below writes through out=; inductor (torch 2.13, T = 4096) gave that
            # result x's strides while its graph said contiguous, and then failed to view it as 3-d
            y = x if scale is None else x * scale
            y = F.pad(y, (0, 0, 0, self.nblk * self.b - self.n)).contiguous()
            return y.view(B, N, self.nblk, self.b, H)
        out = x.new_empty(B, N, self.nblk * self.b, H)
        if scale is None:
            out[:, :, : self.n] = x
        else:
            torch.mul(x, scale, out=out[:, :, : self.n])
        if self.n < out.shape[2]:
            out[:, :, self.n :] = 0
        return out.view(B, N, self.nblk, self.b, H)

    def windows(self, xt):
        """Every block's key window: xt [B, N, S, H] -> contiguous [B, N, nblk, P * b, H], zero off the sequence."""
        lo, hi = max(0, self.j0), min(self.S, self.j0 + self.L)
        if lo >= hi:
            x = xt.new_zeros(*xt.shape[:2], self.L, xt.shape[3])
        elif lo != self.j0 or hi != self.j0 + self.L:
            x = F.pad(xt[:, :, lo:hi], (0, 0, lo - self.j0, self.j0 + self.L - hi))
        else:
            x = xt[:, :, lo:hi]
        return x.unfold(2, self.P * self.b, self.b).transpose(-1, -2).contiguous()

    def fold_into(self, win, xt):
        """xt[:, :, keys] += the adjoint of ``windows`` applied to win [B, N, nblk, P * b, H]."""
        B, N, _, _, H = win.shape
        b, span = self.b, self.nblk * self.b
        for p in range(self.P):
            part = win[:, :, :, p * b : (p + 1) * b]
            start = self.j0 + p * b
            lo, hi = max(0, start), min(self.S, start + span)
            if lo >= hi:
                continue
            if lo == start and hi == start + span:
                xt[:, :, lo:hi].unflatten(2, (self.nblk, b)).add_(part)
            else:
                xt[:, :, lo:hi].add_(part.reshape(B, N, span, H)[:, :, lo - start : hi - start])

    def diagonals(self, x):
        """Band of x [B, N, nblk, b, P * b] (contiguous) as a view: [..., u, r] = x[..., u, u + r], table row r + 1."""
        s = x.stride()
        return x.as_strided((*x.shape[:4], 2 * self.K - 1), (s[0], s[1], s[2], s[3] + 1, 1), x.storage_offset())

    def unblocks(self, x):
        """[B, N, nblk, b, ...] -> [B, N, n, ...]."""
        return x.reshape(*x.shape[:2], self.nblk * self.b, *x.shape[4:])[:, :, : self.n]


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
    def forward(ctx, q, k, v, rel_k, rel_v, plan, scale):
        q, k, v = (_kernel_ready(x) for x in (q, k, v))
        B, T, N, H = q.shape
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, N, L, H] views
        rk = None if rel_k is None else _heads(rel_k, N)  # [N, R, H]
        rv = None if rel_v is None else _heads(rel_v, N)
        band_on = plan.K > 0
        z = q.new_empty(B, T, N, H) if band_on else q.new_zeros(B, T, N, H)
        zt = z.transpose(1, 2)
        lse = q.new_empty(B, N, T) if band_on else q.new_full((B, N, T), -torch.inf)
        for r0, r1 in plan.chunks(_FORWARD_CHUNKS * plan.chunk):
            acc, m = zt[:, :, r0:r1], lse[:, :, r0:r1]
            if band_on:
                _band_forward(_Band(plan, r0, r1), qt, kt, vt, rk, rv, scale, acc, m)
            for c in plan.calls(r0, r1):
                (lo, hi), (s0, s1) = c.rows, c.keys
                ck = _tail_keys(k, s0, s1, rk, c)
                o, l = _flash(_take(qt, lo, hi, c.flip), ck, _take(vt, s0, s1, c.flip), 0.0, c.causal, scale=scale)
                del ck
                if c.flip:
                    o, l = o.flip(2), l.flip(2)
                if rv is not None:
                    o += rv[:, c.row, None]
                _merge(acc[:, :, lo - r0 : hi - r0], m[:, :, lo - r0 : hi - r0], o, l)
                del o, l
        ctx.save_for_backward(q, k, v, rel_k, rel_v, z, lse)
        ctx.plan, ctx.scale = plan, scale
        return z

    @staticmethod
    def backward(ctx, dz):
        q, k, v, rel_k, rel_v, z, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        B, T, N, H = q.shape
        R = 2 * plan.K + 1
        dz = _kernel_ready(dz)
        qt, kt, vt, zt, dzt = (x.transpose(1, 2) for x in (q, k, v, z, dz))
        rk = None if rel_k is None else _heads(rel_k, N)
        rv = None if rel_v is None else _heads(rel_v, N)
        lse = torch.where(torch.isfinite(lse), lse, 0.0)
        dq, dk, dv = (torch.zeros_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
        dqt, dkt, dvt = (x.transpose(1, 2) for x in (dq, dk, dv))
        drk = None if rk is None else q.new_zeros(N, R, H)
        drv = None if rv is None else q.new_zeros(N, R, H)
        for r0, r1 in plan.chunks(plan.chunk):
            out_row, out = None, zt[:, :, r0:r1]  # z - a^V of the tail being run, over the chunk
            for c in plan.calls(r0, r1, tile=plan.chunk):
                (lo, hi), (s0, s1), row = c.rows, c.keys, c.row
                if c.flip:  # reversed copies of this triangle's rows and keys only
                    if rv is not None:
                        out_row, out = None, None
                    cout = zt[:, :, lo:hi].flip(2)
                    if rv is not None:
                        cout -= rv[:, row, None]
                else:
                    if rv is not None and out_row != row:
                        out_row, out = row, zt[:, :, r0:r1] - rv[:, row, None]
                    cout = out[:, :, lo - r0 : hi - r0]
                ck = _tail_keys(k, s0, s1, rk, c)
                g = _flash_bwd(_take(dzt, lo, hi, c.flip), _take(qt, lo, hi, c.flip), ck, _take(vt, s0, s1, c.flip),
                               cout, _take(lse, lo, hi, c.flip), 0.0, c.causal, scale=scale)
                del ck, cout
                if drk is not None:
                    drk[:, row].add_(g[1].sum((0, 2)))
                if drv is not None:
                    drv[:, row].add_(g[2].sum((0, 2)))
                for x, (a0, a1), gx in ((dqt, c.rows, g[0]), (dkt, c.keys, g[1]), (dvt, c.keys, g[2])):
                    x[:, :, a0:a1].add_(gx.flip(2) if c.flip else gx)
                del g, gx
            del out
            if plan.K > 0:
                _band_backward(_Band(plan, r0, r1), qt, kt, vt, zt, dzt, lse, rk, rv, scale, dqt, dkt, dvt, drk, drv)
        if drk is not None:
            drk = drk.sum(0) if rel_k.dim() == 2 else drk.transpose(0, 1)
        if drv is not None:
            drv = drv.sum(0) if rel_v.dim() == 2 else drv.transpose(0, 1)
        return dq, dk, dv, drk, drv, None, None


def _merge(acc, m, o, l):
    """acc, m <- the log-sum-exp merge of (acc, m) and (o, l): acc [B, N, n, H] (finite), m [B, N, n], l finite."""
    acc.lerp_(o, torch.sigmoid(l - m)[..., None])  # weight of o: e^l / (e^m + e^l); 1 where m = -inf
    torch.logaddexp(m, l, out=m)


def _band_forward(band, qt, kt, vt, rk, rv, scale, acc, m):
    """Write the band's output and lse for rows [r0, r1) into acc [B, N, n, H] and m [B, N, n] (0, -inf: no entry)."""
    r0, r1 = band.rows
    K = band.K
    qs = band.blocks(qt[:, :, r0:r1], scale)  # [B, N, nblk, b, H]: scale * q
    s = torch.matmul(qs, band.windows(kt).transpose(-1, -2))  # [B, N, nblk, b, P * b]
    if rk is not None:
        band.diagonals(s).add_(_rows_times(qs, rk[:, 1 : 2 * K].transpose(-1, -2)))  # + scale q . a^K_ij
    del qs
    s.masked_fill_(band.invalid(s.device), -torch.inf)
    mx = s.amax(-1).clamp_min_(torch.finfo(s.dtype).min)  # finite
    p = s.sub_(mx[..., None]).exp_()
    total = p.sum(-1)
    o = torch.matmul(p, band.windows(vt))
    if rv is not None:
        o += _rows_times(band.diagonals(p), rv[:, 1 : 2 * K])
    o /= total.clamp_min(torch.finfo(s.dtype).tiny)[..., None]
    acc.copy_(band.unblocks(o))
    m.copy_(band.unblocks(mx.add_(total.log_())))


def _band_backward(band, qt, kt, vt, zt, dzt, lse, rk, rv, scale, dqt, dkt, dvt, drk, drv):
    """Add the band's share of rows [r0, r1) into dqt, dkt, dvt ([B, N, L, H] views) and drk, drv [N, R, H].

    Ordered so that at most about 7 chunk-sized buffers ([B, N, n, H]; a window counts P) are alive.
    """
    r0, r1 = band.rows
    K = band.K
    dzb = band.blocks(dzt[:, :, r0:r1])
    ds = torch.matmul(dzb, band.windows(vt).transpose(-1, -2))  # dz . v_j  [B, N, nblk, b, P * b]
    if rv is not None:
        band.diagonals(ds).add_(_rows_times(dzb, rv[:, 1 : 2 * K].transpose(-1, -2)))  # + dz . a^V_ij
    ds.sub_(band.blocks((dzt[:, :, r0:r1] * zt[:, :, r0:r1]).sum(-1, keepdim=True)))  # - D, D = dz . z
    qs = band.blocks(qt[:, :, r0:r1], scale)
    k_win = band.windows(kt)
    p = torch.matmul(qs, k_win.transpose(-1, -2))
    if rk is not None:
        band.diagonals(p).add_(_rows_times(qs, rk[:, 1 : 2 * K].transpose(-1, -2)))
    p.masked_fill_(band.invalid(p.device), -torch.inf)
    p.sub_(band.blocks(lse[:, :, r0:r1, None])).exp_()  # probabilities; off-band entries are exp(-inf) = 0
    ds.mul_(p)  # d logits = p * (dz . (v_j + a^V_ij) - D)
    dq = torch.matmul(ds, k_win)
    del k_win
    if rk is not None:
        dqa = band.diagonals(ds)  # [B, N, nblk, b, 2K - 1]: d logits per table row 1 .. 2K - 1
        dq += _rows_times(dqa, rk[:, 1 : 2 * K])
        drk[:, 1 : 2 * K].add_(_rows_dot(dqa, qs))
        del dqa
    dqt[:, :, r0:r1].add_(band.unblocks(dq), alpha=scale)
    del dq
    band.fold_into(torch.matmul(ds.transpose(-1, -2), qs), dkt)  # ds^T (scale q)
    del ds, qs
    band.fold_into(torch.matmul(p.transpose(-1, -2), dzb), dvt)
    if rv is not None:
        drv[:, 1 : 2 * K].add_(_rows_dot(band.diagonals(p), dzb))


def _rows_times(x, t):
    """x [B, N, nblk, b, I] times a per-head matrix t [N, I, J] -> [B, N, nblk, b, J]."""
    B, N, X, U, I = x.shape
    return torch.matmul(x.reshape(B, N, X * U, I), t).view(B, N, X, U, t.shape[-1])


def _rows_dot(x, y):
    """sum over batch and rows of x^T y: x [B, N, nblk, b, I], y [B, N, nblk, b, J] -> [N, I, J]."""
    B, N, X, U, _ = x.shape
    return torch.matmul(x.reshape(B, N, X * U, -1).transpose(-1, -2), y.reshape(B, N, X * U, -1)).sum(0)
