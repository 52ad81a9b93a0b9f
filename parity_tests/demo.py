"""Parity demo: one set of weights, three implementations, one answer.

Builds a RelativeMultiHeadAttention in PyTorch, copies its parameters by name into
the Flax NNX twin, runs both and the float64 NumPy oracle on the same inputs and
prints the largest differences. Run: ``python -m parity_tests.demo``.
"""

from __future__ import annotations

import numpy as np


def main() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import relattn_jax
    import relattn_torch

    from . import oracle

    E, N, k, B, T = 64, 4, 8, 2, 24
    torch.manual_seed(0)
    pt = relattn_torch.RelativeMultiHeadAttention(E, N, max_distance=k, share_relative_heads=False, dtype=torch.float64)
    jx = relattn_jax.RelativeMultiHeadAttention(E, N, max_distance=k, share_relative_heads=False,
                                                param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    params = {name: p.detach().numpy() for name, p in pt.named_parameters()}
    for name, value in params.items():
        getattr(jx, name)[...] = jnp.asarray(value)

    x = np.random.default_rng(0).standard_normal((B, T, E))
    mask = np.ones((B, 1, 1, T), bool)
    mask[1, ..., T // 2:] = False
    out_pt = pt(torch.from_numpy(x), mask=torch.from_numpy(mask), is_causal=True).detach().numpy()
    out_jx = np.asarray(jx(jnp.asarray(x), mask=jnp.asarray(mask), is_causal=True))
    ref = oracle.multi_head_attention(params, x, max_distance=k, mask=mask, is_causal=True)
    print(f"RelativeMultiHeadAttention E={E} N={N} max_distance={k}, B={B} T={T}, causal + padding, float64")
    print(f"  max |torch - oracle| = {np.abs(out_pt - ref).max():.2e}")
    print(f"  max |jax   - oracle| = {np.abs(out_jx - ref).max():.2e}")
    print(f"  max |torch - jax|    = {np.abs(out_pt - out_jx).max():.2e}   (output scale {np.abs(ref).max():.2f})")


if __name__ == "__main__":
    main()
