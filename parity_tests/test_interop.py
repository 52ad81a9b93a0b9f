"""Importing each framework's standard attention, and the Linen bridge."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import linen, nnx  # noqa: E402
from flax.nnx.nn.attention import dot_product_attention_weights  # noqa: E402

import relattn_jax as rj  # noqa: E402
import relattn_torch as rt  # noqa: E402

from .backends import param_name  # noqa: E402
from .numerics import relative_error  # noqa: E402

# Max abs error / max |reference| allowed when matching the source module.
REL_TOL = {"float64": 1e-12, "float32": 1e-5}
RELATIVE = {"off": dict(relative_keys=False, relative_values=False), "on": dict(max_distance=3)}




def torch_source(dtype, bias=True, E=8, N=2):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(E, N, bias=bias, batch_first=True, dtype=getattr(torch, dtype))
    if bias:  # torch initialises biases to zero; make them count
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha.eval()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("relative", ["off", "on"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_from_torch_mha_matches_source(dtype, relative, bias, cross):
    mha = torch_source(dtype, bias)
    ours = rt.from_torch_mha(mha, **RELATIVE[relative])
    g = torch.Generator().manual_seed(1)
    dt = getattr(torch, dtype)
    q = torch.randn(2, 4, 8, generator=g, dtype=dt)
    k = torch.randn(2, 6, 8, generator=g, dtype=dt) if cross else q
    v = torch.randn(2, 6, 8, generator=g, dtype=dt) if cross else q
    ignore = torch.zeros(2, k.shape[1], dtype=torch.bool)
    ignore[1, -2:] = True  # torch: True = ignore this key
    with torch.no_grad():
        ref = mha(q, k, v, key_padding_mask=ignore, need_weights=False)[0]
        got = ours(q, k, v, mask=~ignore[:, None, None, :])
    assert relative_error(got, ref) <= REL_TOL[dtype]
    assert (ours.rel_k is None) == (relative == "off")
    assert ours.w_q.dtype == dt
    assert (ours.b_q is None) if not bias else (ours.b_q.dtype == dt)


def test_from_torch_mha_causal_mask_and_modes():
    mha = torch_source("float64")
    mha.train()
    ours = rt.from_torch_mha(mha, max_distance=2)
    assert ours.training and ours.dropout == mha.dropout
    ours.eval()
    mha.eval()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    future = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)  # torch: True = not allowed
    with torch.no_grad():
        ref = mha(x, x, x, attn_mask=future, need_weights=False)[0]
        assert relative_error(ours(x, is_causal=True), ref) <= 1e-12
        assert relative_error(ours(x, mask=~future), ref) <= 1e-12


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.nn.MultiheadAttention(8, 2, add_bias_kv=True), "add_bias_kv"),
        (lambda: torch.nn.MultiheadAttention(8, 2, add_zero_attn=True), "add_zero_attn"),
        (lambda: torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=4), "kdim = vdim = embed_dim = 8.*kdim=4, vdim=4"),
    ],
)
def test_from_torch_mha_rejects_unsupported(make, match):
    with pytest.raises(ValueError, match=match):
        rt.from_torch_mha(make())


def test_from_torch_mha_argument_errors():
    with pytest.raises(TypeError, match="mha must be a torch.nn.MultiheadAttention, got Linear"):
        rt.from_torch_mha(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="takes dtype, num_heads from mha"):
        rt.from_torch_mha(torch.nn.MultiheadAttention(8, 2), num_heads=4, dtype=torch.float64)


def exact_attention(query, key, value, mask=None, dtype=None, precision=None, **_):
    """nnx's attention on its explicit path, whose softmax keeps float64 (the default
    path goes through jax.nn.dot_product_attention, which computes it in float32)."""
    w = dot_product_attention_weights(query, key, mask=mask, dtype=dtype, precision=precision)
    return jnp.einsum("...hqk,...khd->...qhd", w, value, precision=precision)


def nnx_source(dtype, bias=True, qkv_features=None, **kw):
    return nnx.MultiHeadAttention(
        2, 8, qkv_features, param_dtype=getattr(jnp, dtype), use_bias=bias, decode=False,
        bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0), **kw,
    )


# Fewer combinations than the torch test: each new nnx shape costs XLA compiles.
@pytest.mark.parametrize(
    "dtype, relative, bias, cross",
    [("float64", "off", True, False), ("float64", "on", False, True), ("float32", "off", False, True),
     ("float32", "on", True, False)],
)
def test_from_nnx_mha_matches_source(dtype, relative, bias, cross):
    kw = {"attention_fn": exact_attention} if dtype == "float64" else {}
    mha = nnx_source(dtype, bias, qkv_features=6 if cross else None, **kw)  # head_dim 3 != 8 / 2
    ours = rj.from_nnx_mha(mha, rngs=nnx.Rngs(1), **RELATIVE[relative])
    rng = np.random.default_rng(0)  # NumPy inputs: no PRNG kernels to compile
    q = jnp.asarray(rng.normal(size=(2, 4, 8)), getattr(jnp, dtype))
    k = jnp.asarray(rng.normal(size=(2, 6, 8)), q.dtype) if cross else q
    v = jnp.asarray(rng.normal(size=(2, 6, 8)), q.dtype) if cross else q
    mask = jnp.ones((2, 1, 1, k.shape[1]), bool).at[1, ..., -2:].set(False)
    ref = mha(q, k, v, mask=mask, deterministic=True)
    got = ours(q, k, v, mask=mask)
    assert got.dtype == ref.dtype
    assert relative_error(got, ref) <= REL_TOL[dtype]
    assert ours.head_dim == mha.head_dim and (ours.b_q is None) == (not bias)


def test_from_nnx_mha_causal():
    mha = nnx_source("float64", attention_fn=exact_attention)
    ours = rj.from_nnx_mha(mha, rngs=nnx.Rngs(1), max_distance=2)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 8)))
    ref = mha(x, mask=nnx.make_causal_mask(jnp.ones((2, 5))), deterministic=True)
    assert relative_error(ours(x, is_causal=True), ref) <= 1e-12


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(normalize_qk=True), "normalize_qk"),
        (dict(num_kv_heads=1), "num_kv_heads = num_heads = 2.*got 1"),
        (dict(out_features=4), "out_features = in_features = 8.*out_features=4"),
        (dict(in_kv_features=4), "in_kv_features=4"),
    ],
)
def test_from_nnx_mha_rejects_unsupported(kw, match):
    with pytest.raises(ValueError, match=match):
        rj.from_nnx_mha(nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0), **kw), rngs=nnx.Rngs(0))


def test_from_nnx_mha_argument_errors():
    with pytest.raises(TypeError, match="mha must be a flax.nnx.MultiHeadAttention, got Linear"):
        rj.from_nnx_mha(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="takes head_dim from mha"):
        rj.from_nnx_mha(nnx_source("float32"), rngs=nnx.Rngs(0), head_dim=4)


def test_torch_mha_to_jax_through_the_weight_file(tmp_path):
    """torch.nn.MultiheadAttention -> from_torch_mha -> file -> relattn_jax: same outputs."""
    mha = torch_source("float64")
    path = tmp_path / "mha.safetensors"
    rt.save_weights(rt.from_torch_mha(mha, max_distance=3), path)
    ours = rj.RelativeMultiHeadAttention(8, 2, max_distance=3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    rj.load_weights(ours, path)
    x = np.random.default_rng(0).normal(size=(2, 5, 8))
    with torch.no_grad():
        ref = mha(*(torch.from_numpy(x),) * 3, need_weights=False)[0].numpy()
    assert relative_error(ours(jnp.asarray(x)), ref) <= 1e-12


def test_nnx_mha_to_torch_through_the_weight_file(tmp_path):
    mha = nnx_source("float64", attention_fn=exact_attention)
    path = tmp_path / "mha.safetensors"
    rj.save_weights(rj.from_nnx_mha(mha, rngs=nnx.Rngs(0)), path)
    ours = rt.RelativeMultiHeadAttention(8, 2, dtype=torch.float64)
    rt.load_weights(ours, path)
    x = np.random.default_rng(0).normal(size=(2, 5, 8))
    ref = mha(jnp.asarray(x), deterministic=True)
    with torch.no_grad():
        assert relative_error(ours(torch.from_numpy(x)), ref) <= 1e-12


class LinenModel(linen.Module):
    """A Linen model using relattn_jax through nnx.bridge.to_linen."""

    @linen.compact
    def __call__(self, x, mask=None):
        x = linen.Dense(8, name="inp")(x)
        attn = nnx.bridge.to_linen(rj.RelativeMultiHeadAttention, 8, 2, max_distance=3, name="attn")
        return attn(x, mask=mask)


def test_linen_bridge_init_apply_jit_and_same_outputs(tmp_path):
    model = LinenModel()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
    mask = jnp.ones((2, 1, 1, 5), bool).at[0, ..., 3:].set(False)
    variables = model.init(jax.random.key(1), x, mask)
    attn_params = variables["params"]["attn"]
    assert sorted(attn_params) == ["b_k", "b_o", "b_q", "b_v", "rel_k", "rel_v", "w_k", "w_o", "w_q", "w_v"]
    y = model.apply(variables, x, mask)
    y_jit = jax.jit(model.apply)(variables, x, mask)
    np.testing.assert_allclose(y_jit, y, rtol=0, atol=1e-6)

    # The same weights in a plain nnx module, moved through the weight file: same output.
    nnx_attn = rj.RelativeMultiHeadAttention(8, 2, max_distance=3, rngs=nnx.Rngs(9))
    nnx.update(nnx_attn, nnx.from_flat_state({(n,): v for n, v in attn_params.items()}))
    rj.save_weights(nnx_attn, tmp_path / "attn.safetensors")
    fresh = rj.RelativeMultiHeadAttention(8, 2, max_distance=3, rngs=nnx.Rngs(10))
    rj.load_weights(fresh, tmp_path / "attn.safetensors")
    h = linen.Dense(8).apply({"params": variables["params"]["inp"]}, x)
    np.testing.assert_allclose(fresh(h, mask=mask), y, rtol=0, atol=1e-6)

    # And a file (here from PyTorch) loads into the Linen variables by name.
    torch.manual_seed(0)
    t = rt.RelativeMultiHeadAttention(8, 2, max_distance=3, dtype=torch.float32)
    rt.save_weights(t, tmp_path / "torch.safetensors")
    rj.load_weights(fresh, tmp_path / "torch.safetensors")
    new_attn = {param_name(p): v[...] for p, v in nnx.to_flat_state(nnx.state(fresh, nnx.Param))}
    variables = {"params": {**variables["params"], "attn": new_attn}}
    with torch.no_grad():
        ref = t(torch.from_numpy(np.array(h)), mask=torch.from_numpy(np.array(mask))).numpy()
    np.testing.assert_allclose(model.apply(variables, x, mask), ref, rtol=0, atol=2e-5)
