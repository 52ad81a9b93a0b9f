"""The modules against the oracle (float64), under jit / torch.compile, with dropout."""

from __future__ import annotations

import numpy as np
import pytest

from . import oracle
from .backends import backend
from .numerics import assert_close


def randomize(bk, module, seed=0):
    """Random unit-scale parameters (biases non-zero too), set by name; returns them."""
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(p.shape) * 0.5 for n, p in bk.params(module).items()}
    bk.set_params(module, params)
    return params


CONFIGS = {
    "self, shared tables": dict(kw={}, T=6, S=6),
    "per-head tables": dict(kw=dict(share_relative_heads=False), T=6, S=6),
    "keys only": dict(kw=dict(relative_values=False), T=5, S=5),
    "values only": dict(kw=dict(relative_keys=False), T=5, S=5),
    "neither": dict(kw=dict(relative_keys=False, relative_values=False), T=5, S=5),
    "no bias, head_dim 5": dict(kw=dict(bias=False, head_dim=5), T=4, S=4),
    "cross T<S": dict(kw={}, T=3, S=7),
    "cross T>S": dict(kw=dict(max_distance=1), T=7, S=3),
    "max_distance > length": dict(kw=dict(max_distance=20), T=6, S=6),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("is_causal", [False, True])
def test_relative_mha_matches_oracle(bk, name, is_causal):
    cfg = CONFIGS[name]
    E, N, k = 12, 3, cfg["kw"].get("max_distance", 2)
    m = bk.module("RelativeMultiHeadAttention", E, N, **{"max_distance": k, **cfg["kw"]})
    params = randomize(bk, m)
    rng = np.random.default_rng(1)
    query = rng.standard_normal((2, cfg["T"], E))
    key = rng.standard_normal((2, cfg["S"], E))
    mask = np.ones((2, 1, 1, cfg["S"]), bool)
    mask[1, ..., -1] = False
    cross = cfg["T"] != cfg["S"]
    args = (query, key) if cross else (query,)
    out = bk.call(m, *args, mask=mask, is_causal=is_causal)
    ref = oracle.multi_head_attention(params, query, key if cross else None, max_distance=k, mask=mask,
                                      is_causal=is_causal, scale=m.scale)
    assert out.shape == (2, cfg["T"], E)
    assert_close(out, ref)


def test_relative_mha_q_offset_and_value(bk):
    E, N, k = 8, 2, 2
    m = bk.module("RelativeMultiHeadAttention", E, N, max_distance=k, scale=0.3)
    params = randomize(bk, m)
    rng = np.random.default_rng(2)
    query, key, value = (rng.standard_normal((1, L, E)) for L in (3, 5, 5))
    out = bk.call(m, query, key, value, q_offset=0)
    p = {n: np.asarray(x) for n, x in params.items()}
    ref = oracle.multi_head_attention(p, query, key, value, max_distance=k, scale=0.3, q_offset=0)
    assert_close(out, ref)


def test_table_rows_and_parameter_shapes(bk):
    shared = bk.params(bk.module("RelativeMultiHeadAttention", 16, 4, max_distance=3))
    assert shared["rel_k"].shape == (7, 4) and shared["rel_v"].shape == (7, 4)
    assert shared["w_q"].shape == (16, 4, 4) and shared["w_o"].shape == (4, 4, 16)
    per_head = bk.params(bk.module("RelativeMultiHeadAttention", 16, 4, max_distance=3, share_relative_heads=False))
    assert per_head["rel_k"].shape == (7, 4, 4)
    bare = bk.params(bk.module("RelativeMultiHeadAttention", 16, 4, bias=False, relative_keys=False,
                               relative_values=False))
    assert sorted(bare) == ["w_k", "w_o", "w_q", "w_v"]


def test_relation_aware_attention_matches_oracle(bk):
    N, H, B, S = 3, 4, 2, 5
    m = bk.module("RelationAwareAttention", N, H)
    params = randomize(bk, m)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, S, N, H))
    a_k, a_v = rng.standard_normal((S, S, N, H)), rng.standard_normal((S, S, H))
    out = bk.call(m, x, a_k, a_v, is_causal=True)
    q, k, v = (np.einsum("bsni,nih->bsnh", x, params[w]) for w in ("w_q", "w_k", "w_v"))
    assert_close(out, oracle.relative_attention(q, k, v, a_k, a_v, is_causal=True))
    table, ids = rng.standard_normal((3, N, H)), oracle.shaw_ids(S, S, 1)
    out = bk.call(m, x, table, None, rel_ids=ids)
    assert_close(out, oracle.relative_attention(q, k, v, table, None, rel_ids=ids))


def test_float32_module_default_dtype(bk):
    m = bk.module("RelativeMultiHeadAttention", 8, 2, dtype="float32")
    out = bk.call(m, np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32), is_causal=True)
    assert out.dtype == np.float32 and np.isfinite(out).all()


# --- dropout -----------------------------------------------------------------------------------

def test_torch_dropout_only_in_training():
    bk = backend("torch")
    torch = bk.torch
    torch.manual_seed(0)
    m = bk.module("RelativeMultiHeadAttention", 8, 2, dropout=0.5)
    ref = bk.module("RelativeMultiHeadAttention", 8, 2)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    m.eval()
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    m.train()
    a, b = m(x), m(x)
    assert not torch.allclose(a, ref(x)) and not torch.allclose(a, b)
    assert torch.isfinite(a).all()


def test_jax_dropout_only_when_not_deterministic():
    bk = backend("jax")
    nnx, jnp = bk.nnx, bk.jnp
    m = bk.lib.RelativeMultiHeadAttention(8, 2, dropout=0.5, param_dtype=jnp.float64, rngs=nnx.Rngs(0, dropout=1))
    ref = bk.lib.RelativeMultiHeadAttention(8, 2, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 8)))
    np.testing.assert_array_equal(m(x, deterministic=True), ref(x))
    a, b = m(x), m(x)  # module default: dropout active, fresh keys per call
    assert not np.allclose(a, ref(x)) and not np.allclose(a, b)
    m.eval()
    np.testing.assert_array_equal(m(x), ref(x))
    bare = bk.lib.RelativeMultiHeadAttention(8, 2, dropout=0.5, rngs=nnx.Rngs(0))
    out = bare(x.astype(jnp.float32), rngs=nnx.Rngs(dropout=3))
    assert np.isfinite(np.asarray(out)).all()


# --- compilation -------------------------------------------------------------------------------

def test_jax_jit_and_grad_match_eager():
    bk = backend("jax")
    jax, jnp, nnx = bk.jax, bk.jnp, bk.nnx
    rng = np.random.default_rng(4)
    B, T, N, H = 2, 6, 2, 4
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H))) for _ in range(3))
    rk, rv = jnp.asarray(rng.standard_normal((5, H))), jnp.asarray(rng.standard_normal((5, N, H)))
    ids = bk.lib.relative_position_ids(T, T, 2)
    f = lambda *a: bk.lib.relative_attention(*a, rel_ids=ids, is_causal=True)  # noqa: E731
    np.testing.assert_allclose(jax.jit(f)(q, k, v, rk, rv), f(q, k, v, rk, rv), rtol=0, atol=1e-13)
    loss = lambda *a: (f(*a) ** 2).sum()  # noqa: E731
    g_eager = jax.grad(loss, argnums=(0, 3, 4))(q, k, v, rk, rv)
    g_jit = jax.jit(jax.grad(loss, argnums=(0, 3, 4)))(q, k, v, rk, rv)
    for a, b in zip(g_eager, g_jit):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    # ids traced under jit: the range check is skipped, the math is unchanged
    traced = jax.jit(lambda ids: bk.lib.relative_attention(q, k, v, rk, rv, rel_ids=ids))(ids)
    np.testing.assert_allclose(traced, bk.lib.relative_attention(q, k, v, rk, rv, rel_ids=ids), atol=1e-13)
    m = bk.lib.RelativeMultiHeadAttention(8, 2, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 5, 8)))
    jitted = nnx.jit(lambda m, x: m(x, is_causal=True))(m, x)
    np.testing.assert_allclose(jitted, m(x, is_causal=True), rtol=0, atol=1e-13)
    grads = nnx.grad(lambda m: (m(x, is_causal=True) ** 2).sum())(m)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_torch_compile_matches_eager():
    bk = backend("torch")
    torch = bk.torch
    torch.manual_seed(0)
    m = bk.module("RelativeMultiHeadAttention", 16, 2, max_distance=3, dtype="float32")
    x = torch.randn(2, 7, 16)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., -2:] = False
    compiled = torch.compile(m, fullgraph=True)
    eager = m(x, mask=mask, is_causal=True)
    out = compiled(x, mask=mask, is_causal=True)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()  # backward through the compiled graph works too
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
