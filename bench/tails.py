"""Ways to cover one Shaw tail with torch's fused CPU kernel: ``python -m bench.tails [--threads N]``.

A tail of the banded Shaw path (``relattn_torch/shaw.py``) is a triangle: query row i sees keys
j <= i - K. Per L, prints the median ms (forward, and forward + backward; rounds interleaved as in
``bench.case``) of: the full square
(what the floor pays), the one causal call the path makes, and row pieces of m rows, each one
call with an additive mask for its own triangle. docs/performance.md quotes these numbers.
"""

from __future__ import annotations

import argparse

import torch

from bench.case import _time


def covers(L, K=16, B=2, N=8, H=64, pieces=(32, 64, 128, 256), backward=False, seed=0):
    """{name: callable} covering the left tail of L rows / keys in each way (``backward``: fwd + bwd)."""
    from relattn_torch._flash_op import flash, flash_bwd

    g = torch.Generator().manual_seed(seed)
    q, k, v, dz = (torch.randn(B, N, L, H, generator=g) for _ in range(4))
    scale = H ** -0.5

    def run(rows, keys, causal, mask=None):
        (a, b), n = rows, keys
        o, lse = flash(q[:, :, a:b], k[:, :, :n], v[:, :, :n], 0.0, causal, attn_mask=mask, scale=scale)
        if backward:
            flash_bwd(dz[:, :, a:b], q[:, :, a:b], k[:, :, :n], v[:, :, :n], o, lse, 0.0, causal,
                      attn_mask=mask, scale=scale)
        return o, lse

    def piecewise(m):
        def f():
            out = []
            for a in range(K, L, m):
                b = min(a + m, L)
                i, j = torch.arange(a, b)[:, None], torch.arange(b - K)[None]
                mask = torch.zeros(b - a, b - K).masked_fill_(j > i - K, -torch.inf)[None, None]
                out.append(run((a, b), b - K, False, mask))
            return out
        return f

    return {"full": lambda: run((0, L), L, False), "causal": lambda: [run((K, L), L - K, True)],
            **{f"pieces_{m}": piecewise(m) for m in pieces}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    for L in a.sizes:
        for backward in (False, True):
            steps = covers(L, backward=backward)
            for step in steps.values():
                step()  # warm-up
            cells = _time(steps, a.repeats)  # interleaved rounds, as bench.case times a group
            print(f"L={L} {'fwd+bwd' if backward else 'fwd'} threads={torch.get_num_threads()}: "
                  + " ".join(f"{n} {t['median_s'] * 1e3:.1f} ms" for n, t in cells.items()), flush=True)


if __name__ == "__main__":
    main()
