"""Cross-framework parity through the weight file: outputs, input and parameter gradients.

The sweep draws configurations with hypothesis (12 under the ``ci`` profile; run
``pytest --slow`` for the long sweep); the named cases pin every family the issue
lists so a small sweep can never miss one.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .harness import Config, build, compare, describe, failures, inputs, normalize
from .numerics import allowed_error

pytest.importorskip("torch")
pytest.importorskip("jax")

QUANTITIES = ["output", "grad_inputs", "grad_params", "oracle"]


def configs(max_len: int = 5, max_heads: int = 3, max_head_dim: int = 4, dtypes=("float64", "float32")):
    """Hypothesis strategy over the configuration space of the issue."""
    return st.builds(
        Config,
        kind=st.sampled_from(["mha", "mha", "raa"]),
        B=st.integers(1, 2),
        T=st.integers(1, max_len),
        S=st.integers(1, max_len),
        N=st.integers(1, max_heads),
        H=st.integers(1, max_head_dim),
        E=st.integers(1, 8),
        cross=st.booleans(),
        max_distance=st.integers(0, max_len + 2),  # includes max_distance > length
        tables=st.sampled_from(["shared", "per_head"]),
        relative=st.sampled_from(["both", "keys", "values", "neither"]),
        relation=st.sampled_from(["ids", "dense"]),
        mask=st.sampled_from(["none", "padding", "causal", "both"]),
        empty_row=st.booleans(),
        bias=st.booleans(),
        dtype=st.sampled_from(dtypes),
        source=st.sampled_from(["torch", "jax"]),
        seed=st.integers(0, 2**16),
    )


def assert_parity(cfg: Config, expect=QUANTITIES):
    results = compare(cfg)
    assert [r.quantity for r in results] == expect
    bad = failures(results)
    assert not bad, describe(cfg, bad)


@given(configs())
def test_sweep(cfg):
    assert_parity(cfg)


@pytest.mark.slow
@settings(max_examples=300)
@given(configs(max_len=9, max_heads=4, max_head_dim=8))
def test_sweep_long(cfg):
    assert_parity(cfg)


NAMED = {
    "self-both-shared": Config(),
    "jax-to-torch": Config(source="jax", tables="per_head"),
    "cross-T<S-padding+causal": Config(cross=True, T=3, S=5, mask="both", tables="per_head"),
    "cross-T>S-causal-empty-rows": Config(cross=True, T=5, S=3, mask="causal"),
    "padding-fully-masked-keys-only": Config(mask="padding", empty_row=True, relative="keys"),
    "T=1-values-only-no-bias": Config(T=1, relative="values", bias=False),
    "neither-relative-max_distance=0": Config(relative="neither", mask="causal", max_distance=0),
    "max_distance>length": Config(T=3, max_distance=7, source="jax"),
    "raa-dense-per-head-both-masks": Config(kind="raa", relation="dense", mask="both", tables="per_head"),
    "raa-ids-float32": Config(kind="raa", relation="ids", dtype="float32", source="jax"),
    "float32-wider": Config(dtype="float32", B=2, T=6, N=4, H=8, E=32, max_distance=3),
}


@pytest.mark.parametrize("cfg", NAMED.values(), ids=NAMED.keys())
def test_named_family(cfg):
    assert_parity(cfg)


@pytest.mark.parametrize("cfg", [Config(dtype="bfloat16"), Config(kind="raa", relation="dense", dtype="bfloat16",
                                                                   source="jax", mask="causal")], ids=["mha", "raa"])
def test_bfloat16_smoke(cfg):
    """bf16 weights through the file; outputs only (softmax is float32 inside)."""
    assert_parity(cfg, expect=["output", "oracle"])


def test_harness_catches_a_wrong_weight():
    """Perturbing one loaded parameter by 1e-9 must fail the float64 comparison."""
    k = 2  # table row k is relative distance 0, used by every query

    def nudge(module):
        if hasattr(module, "named_parameters"):
            import torch

            with torch.no_grad():
                module.rel_k[k, 0] += 1e-9
        else:
            module.rel_k[...] = module.rel_k[...].at[k, 0].add(1e-9)

    results = compare(Config(T=4, max_distance=k), after_load=nudge)
    assert {r.quantity for r in failures(results)} >= {"output", "oracle"}


def test_normalize_makes_configs_consistent():
    assert normalize(Config(T=3, S=5, cross=False)).S == 3
    raa = normalize(Config(kind="raa", cross=True, T=4, S=2, N=2, H=3, bias=True))
    assert (raa.S, raa.cross, raa.bias, raa.E) == (4, False, False, 6)


def test_jax_jit_equals_eager():
    cfg = Config(mask="both", cross=True, T=3, S=4)
    b, m = build("jax", cfg, seed=0)
    arrays, kw = inputs(cfg)
    jnp, nnx = b.jnp, b.nnx
    x = {n: jnp.asarray(a) for n, a in arrays.items()}
    mask = jnp.asarray(kw["mask"])
    eager = m(x["query"], x["key"], x["value"], mask=mask, is_causal=True)
    jitted = nnx.jit(lambda m, q, k, v, mask: m(q, k, v, mask=mask, is_causal=True))(m, x["query"], x["key"],
                                                                                     x["value"], mask)
    assert float(jnp.abs(eager - jitted).max()) <= allowed_error(np.asarray(eager))


def test_torch_compile_equals_eager():
    torch = pytest.importorskip("torch")
    cfg = Config(mask="both", cross=True, T=3, S=4)
    b, m = build("torch", cfg, seed=0)
    arrays, kw = inputs(cfg)
    x = {n: torch.from_numpy(a) for n, a in arrays.items()}
    mask = torch.from_numpy(kw["mask"])
    with torch.no_grad():
        eager = m(x["query"], x["key"], x["value"], mask=mask, is_causal=True)
        compiled = torch.compile(m, fullgraph=True)(x["query"], x["key"], x["value"], mask=mask, is_causal=True)
    assert float((eager - compiled).abs().max()) <= allowed_error(eager.numpy())


def test_seed2_module_through_weight_file(tmp_path):
    """The seed-2 tutorial module, mapped to our names, saved once, reproduced by both."""
    torch = pytest.importorskip("torch")
    import relattn_jax
    import relattn_torch

    from .seeds import Seed2MultiHeadAttention, seed2_params

    torch.manual_seed(0)
    E, N, B, T, S = 8, 2, 2, 4, 5
    seed = Seed2MultiHeadAttention(E, N).double()
    q, k, v = (torch.randn(B, L, E, dtype=torch.float64) for L in (T, S, S))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]  # no empty row
    with torch.no_grad():
        expected = seed(v, k, q, mask).numpy()
    options = dict(relative_keys=False, relative_values=False, scale=E**-0.5)
    ours = relattn_torch.RelativeMultiHeadAttention(E, N, dtype=torch.float64, **options)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(torch.from_numpy(seed2_params(seed)[name]))
    path = tmp_path / "seed2.safetensors"
    relattn_torch.save_weights(ours, path)

    t = relattn_torch.RelativeMultiHeadAttention(E, N, dtype=torch.float64, **options)
    relattn_torch.load_weights(t, path)
    j = _jax_module(relattn_jax.RelativeMultiHeadAttention, E, N, **options)
    relattn_jax.load_weights(j, path)
    with torch.no_grad():
        got_t = t(q, k, v, mask=mask).numpy()
    got_j = np.asarray(j(*(_jnp(x.numpy()) for x in (q, k, v)), mask=_jnp(mask.numpy())))
    for got in (got_t, got_j):
        np.testing.assert_allclose(got, expected, rtol=0, atol=allowed_error(expected))


def test_seed1_answer_both_frameworks(tmp_path):
    """The seed-1 answer, and both RelationAwareAttention twins from one weight file."""
    torch = pytest.importorskip("torch")
    import relattn_jax
    import relattn_torch

    from .seeds import seed1_answer, seed1_scale

    B, S, N, H = 2, 5, 3, 4
    rng = np.random.default_rng(0)
    X, a_K, a_V = rng.normal(size=(B, S, N, H)), rng.normal(size=(S, S, N, H)), rng.normal(size=(S, S, N, H))
    W = {n: rng.normal(size=(N, H, H)) / H**0.5 for n in ("w_q", "w_k", "w_v")}
    expected = seed1_answer(*(torch.from_numpy(a) for a in (X, W["w_q"], W["w_k"], W["w_v"], a_K, a_V))).numpy()
    ours = relattn_torch.RelationAwareAttention(N, H, scale=seed1_scale(H), dtype=torch.float64)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(torch.from_numpy(W[name]))
    path = tmp_path / "seed1.safetensors"
    relattn_torch.save_weights(ours, path)
    j = _jax_module(relattn_jax.RelationAwareAttention, N, H, scale=seed1_scale(H))
    relattn_jax.load_weights(j, path)
    got_t = ours(*(torch.from_numpy(a) for a in (X, a_K, a_V))).detach().numpy()
    got_j = np.asarray(j(*(_jnp(a) for a in (X, a_K, a_V))))
    for got in (got_t, got_j):
        np.testing.assert_allclose(got, expected, rtol=0, atol=allowed_error(expected))


def _jax_module(cls, *args, **kw):
    import jax.numpy as jnp
    from flax import nnx

    return cls(*args, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kw)


def _jnp(a):
    import jax.numpy as jnp

    return jnp.asarray(a)
