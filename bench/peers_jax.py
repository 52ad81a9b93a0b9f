"""The JAX contestants (all jitted). Each ``make`` returns a step for one benchmark case.

Same inputs as ``peers_torch``: q, k, v [B, T, N, H] float32, Shaw tables [2K+1, H].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import relattn_jax


def _inputs(cfg, dense=False):
    B, T, N, H, K = cfg["B"], cfg["S"], cfg["N"], cfg["H"], cfg["K"]
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    x = {n: jax.random.normal(keys[i], (B, T, N, H)) for i, n in enumerate(("q", "k", "v"))}
    x["rel_k"] = jax.random.normal(keys[3], (2 * K + 1, H)) / H**0.5
    x["rel_v"] = jax.random.normal(keys[4], (2 * K + 1, H)) / H**0.5
    if dense:
        x = {"X": x["q"], **{w: jax.random.normal(keys[5 + i], (N, H, H)) / H**0.5
                             for i, w in enumerate(("W_Q", "W_K", "W_V"))}}
        x["a_K"] = jax.random.normal(keys[3], (T, T, N, H)) / H**0.5
        x["a_V"] = jax.random.normal(keys[4], (T, T, N, H)) / H**0.5
    return x


def _shaw_ids(T, S, K):
    i = jnp.arange(T)[:, None] + (S - T)
    return jnp.clip(jnp.arange(S)[None, :] - i, -K, K) + K


def _causal(T, S):
    return jnp.tril(jnp.ones((T, S), bool), S - T)


def ours(q, k, v, rel_k, rel_v, *, K, causal):
    return relattn_jax.relative_attention(q, k, v, rel_k, rel_v, max_distance=K, is_causal=causal)


def floor(q, k, v, *, causal, **_):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


def naive_shaw(q, k, v, rel_k, rel_v, *, K, causal):
    """Our reference table path: take_along_axis for q.a^K, scatter-add of probabilities into buckets."""
    ids = _shaw_ids(q.shape[1], k.shape[1], K)
    return relattn_jax.relative_attention(q, k, v, rel_k, rel_v, rel_ids=ids, is_causal=causal,
                                          implementation="einsum")


def hf_relative_key(q, k, v, rel_k, *, K, causal, **_):
    T, S, H = q.shape[1], k.shape[1], q.shape[3]
    pe = rel_k[_shaw_ids(T, S, K)]  # [T, S, H] materialised
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) + jnp.einsum("BTNH,TSH->BNTS", q, pe)
    scores = scores / H**0.5
    if causal:
        scores = jnp.where(_causal(T, S), scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(scores, -1), v)


def ours_dense(X, W_Q, W_K, W_V, a_K, a_V):
    q, k, v = (jnp.einsum("BSNI,NIH->BSNH", X, w) for w in (W_Q, W_K, W_V))
    return relattn_jax.relative_attention(q, k, v, a_K, a_V)


def seed1(X, W_Q, W_K, W_V, a_K, a_V):
    """The seed-1 answer, line by line in jnp (the seed itself is PyTorch)."""
    D = X.shape[-1]
    XW_Q = jnp.einsum("bshd,hde->bshe", X, W_Q)
    XW_K = jnp.einsum("bshd,hde->bshe", X, W_K)
    e = (XW_Q[:, :, None] * (XW_K[:, None] + a_K)).sum(-1) / jnp.sqrt(jnp.float32(D))  # [B, S, S, H]
    alpha = jax.nn.softmax(e, axis=2)
    XW_V = jnp.einsum("bshd,hde->bshe", X, W_V)
    return jnp.einsum("bijh,bijhd->bihd", alpha, XW_V[:, None] + a_V)


def key_padding(B, S):
    """[B, 1, 1, S] bool: example 0 unpadded, every other example with its last max(1, S // 8) keys padded."""
    valid = jnp.ones((B, S), bool).at[1:, S - max(1, S // 8) :].set(False)
    return valid[:, None, None, :]


def ours_padded(q, k, v, rel_k, rel_v, *, K, causal):
    mask = key_padding(q.shape[0], k.shape[1])
    return relattn_jax.relative_attention(q, k, v, rel_k, rel_v, max_distance=K, is_causal=causal, mask=mask)


def floor_padded(q, k, v, *, causal, **_):
    return jax.nn.dot_product_attention(q, k, v, mask=key_padding(q.shape[0], k.shape[1]), is_causal=causal)


def make_layer(impl, cfg, causal, mode):
    """Our layer or nnx.MultiHeadAttention of the same width E = N * H on x [B, S, E], jitted with
    the parameters' gradients in the backward."""
    from flax import nnx

    E, N, K, S = cfg["N"] * cfg["H"], cfg["N"], cfg["K"], cfg["S"]
    if impl == "layer":
        model = relattn_jax.RelativeMultiHeadAttention(E, N, max_distance=K, rngs=nnx.Rngs(0))
        call = lambda m, x: m(x, is_causal=causal)  # noqa: E731
    else:
        model = nnx.MultiHeadAttention(num_heads=N, in_features=E, decode=False, rngs=nnx.Rngs(0))
        mask = nnx.make_causal_mask(jnp.ones((1, S))) if causal else None
        call = lambda m, x: m(x, mask=mask)  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(0), (cfg["B"], S, E))
    if mode == "fwd":
        run = nnx.jit(call)
    else:
        run = nnx.jit(nnx.grad(lambda m, x: call(m, x).sum(), argnums=(0, 1)))
    return lambda: jax.block_until_ready(run(model, x))


IMPLS = ["ours", "floor", "naive_shaw", "hf_relative_key", "ours_dense", "seed1",
         "ours_padded", "floor_padded", "ours_bf16", "floor_bf16", "layer", "layer_floor"]


def make(impl, cfg, mode, causal):
    K = cfg["K"]
    if impl in ("ours_dense", "seed1"):
        if causal:
            raise NotImplementedError("dense-edge rows are non-causal only")
        x = _inputs(cfg, dense=True)
        fn = ours_dense if impl == "ours_dense" else seed1
    elif impl in ("layer", "layer_floor"):
        return make_layer(impl, cfg, causal, mode)
    else:
        x = _inputs(cfg)
        if impl.endswith("_bf16"):
            x = {n: a.astype(jnp.bfloat16) for n, a in x.items()}
            impl = impl.removesuffix("_bf16")
        base = {"ours": ours, "floor": floor, "naive_shaw": naive_shaw, "hf_relative_key": hf_relative_key,
                "ours_padded": ours_padded, "floor_padded": floor_padded}[impl]
        fn = lambda **a: base(**a, K=K, causal=causal)  # noqa: E731
        if impl in ("floor", "floor_padded"):
            x = {n: x[n] for n in ("q", "k", "v")}
        if impl == "hf_relative_key":
            x = {n: x[n] for n in ("q", "k", "v", "rel_k")}
    if mode == "fwd":
        run = jax.jit(lambda a: fn(**a))
    else:
        run = jax.jit(jax.grad(lambda a: fn(**a).astype(jnp.float32).sum()))

    def step():
        return jax.block_until_ready(run(x))

    return step
