"""Long-sequence memory check: ``python -m bench.long_sequence --framework torch [-S 16384]``.

Forward + backward of Shaw relative attention (keys and values, k=16) at B=1, N=8, H=64,
T=S (default 16384) through ``relative_attention``'s automatic choice, in this fresh process.
Prints the chosen path, the wall time and the peak resident set size (ru_maxrss), whose
[B, N, T, S] float32 logits alone would need 8 GiB per tensor.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--framework", choices=["torch", "jax"], required=True)
    p.add_argument("-S", type=int, default=16384)
    p.add_argument("--causal", action="store_true")
    a = p.parse_args(argv)
    B, N, H, K, S = 1, 8, 64, 16, a.S
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if a.framework == "torch":
        import torch

        import relattn_torch
        from relattn_torch.einsum import AttentionArgs

        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, S, N, H, generator=g, requires_grad=True) for _ in range(3))
        rk, rv = (torch.randn(2 * K + 1, H, generator=g, requires_grad=True) for _ in range(2))
        out = relattn_torch.relative_attention(q, k, v, rk, rv, max_distance=K, is_causal=a.causal)
        out.sum().backward()
        finite = bool(torch.isfinite(q.grad).all())
        args = AttentionArgs(rel_k=rk, rel_v=rv, is_causal=a.causal, max_distance=K)
        path = relattn_torch.choose_implementation(q, k, v, args).name
    else:
        import jax
        import jax.numpy as jnp

        import relattn_jax
        from relattn_jax.einsum import AttentionArgs

        ks = jax.random.split(jax.random.PRNGKey(0), 5)
        x = [jax.random.normal(ks[i], (B, S, N, H)) for i in range(3)]
        x += [jax.random.normal(ks[3 + i], (2 * K + 1, H)) for i in range(2)]
        f = lambda q, k, v, rk, rv: relattn_jax.relative_attention(  # noqa: E731
            q, k, v, rk, rv, max_distance=K, is_causal=a.causal).sum()
        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(*x)
        jax.block_until_ready(grads)
        finite = bool(jnp.isfinite(grads[0]).all())
        args = AttentionArgs(rel_k=x[3], rel_v=x[4], is_causal=a.causal, max_distance=K)
        path = relattn_jax.choose_implementation(*x[:3], args).name
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(framework=a.framework, S=S, B=B, N=N, H=H, K=K, causal=a.causal, path=path,
                          seconds=round(time.perf_counter() - t, 1), peak_rss_gib=round(peak / 2**20, 2),
                          peak_rss_increase_gib=round((peak - before) / 2**20, 2), finite_grads=finite)))


if __name__ == "__main__":
    main()
