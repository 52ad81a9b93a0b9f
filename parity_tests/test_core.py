"""relative_attention and its helpers against the float64 NumPy oracle, in both frameworks."""

from __future__ import annotations

import numpy as np
import pytest

from . import oracle
from .backends import backend
from .numerics import allowed_error, assert_close, assert_grads_match_finite_differences


def qkv(rng, B=2, T=5, S=5, N=3, H=4):
    return {"q": rng.standard_normal((B, T, N, H)), "k": rng.standard_normal((B, S, N, H)),
            "v": rng.standard_normal((B, S, N, H))}


def check(bk, inputs, **kw):
    ref = oracle.relative_attention(**inputs, **kw)
    assert_close(bk.attention(inputs, **kw), ref)
    return ref


# --- literal expectations -------------------------------------------------------------------------

def test_relative_position_ids_literal(bk):
    ids = bk.numpy(bk.lib.relative_position_ids(3, 3, 1))
    np.testing.assert_array_equal(ids, [[1, 2, 2], [0, 1, 2], [0, 0, 1]])
    ids = bk.numpy(bk.lib.relative_position_ids(2, 4, 1, q_offset=2))
    np.testing.assert_array_equal(ids, [[0, 0, 1, 2], [0, 0, 0, 1]])


@pytest.mark.parametrize("T,S,k,offset", [(5, 5, 2, 0), (3, 7, 1, 4), (6, 4, 10, 0), (1, 9, 3, 8)])
def test_relative_position_ids_match_oracle(bk, T, S, k, offset):
    ids = bk.numpy(bk.lib.relative_position_ids(T, S, k, q_offset=offset))
    np.testing.assert_array_equal(ids, oracle.shaw_ids(T, S, k, offset))
    assert ids.min() >= 0 and ids.max() <= 2 * k


def test_causal_mask_literal(bk):
    np.testing.assert_array_equal(bk.numpy(bk.lib.causal_mask(3, 3)), np.tril(np.ones((3, 3), bool)))
    # bottom-right aligned: two queries that follow two cached keys
    np.testing.assert_array_equal(bk.numpy(bk.lib.causal_mask(2, 4)), [[1, 1, 1, 0], [1, 1, 1, 1]])


def test_padding_and_combined_masks(bk):
    pad = bk.lib.padding_mask(bk.array(np.array([2, 3])), 3)
    assert tuple(pad.shape) == (2, 1, 1, 3)
    np.testing.assert_array_equal(bk.numpy(pad)[:, 0, 0], [[1, 1, 0], [1, 1, 1]])
    both = bk.numpy(bk.lib.combine_masks(pad, None, bk.lib.causal_mask(3, 3)))
    np.testing.assert_array_equal(both[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
    assert bk.lib.combine_masks(None, None) is None


# --- dense edges ------------------------------------------------------------------------------

DENSE_SHAPES = {
    "TSH (shared by heads)": lambda B, T, S, N, H: (T, S, H),
    "TSNH (seed 1)": lambda B, T, S, N, H: (T, S, N, H),
    "BTSNH (per example)": lambda B, T, S, N, H: (B, T, S, N, H),
    "1T1NH (broadcast S)": lambda B, T, S, N, H: (1, T, 1, N, H),
    "B1S1H (broadcast T, N)": lambda B, T, S, N, H: (B, 1, S, 1, H),
}


@pytest.mark.parametrize("form", list(DENSE_SHAPES))
@pytest.mark.parametrize("terms", ["both", "keys", "values"])
def test_dense_edges(bk, form, terms):
    rng = np.random.default_rng(0)
    B, T, S, N, H = 2, 4, 6, 3, 5
    inputs = qkv(rng, B, T, S, N, H)
    shape = DENSE_SHAPES[form](B, T, S, N, H)
    if terms in ("both", "keys"):
        inputs["rel_k"] = rng.standard_normal(shape)
    if terms in ("both", "values"):
        inputs["rel_v"] = rng.standard_normal(shape)
    check(bk, inputs)



@pytest.mark.parametrize("form", list(DENSE_SHAPES))
def test_dense_edge_gradients_match_finite_differences(bk, form):
    """The dense-edge fast paths (block-diagonal GEMMs; a hand-written autograd backward in torch):
    every input's gradient is checked against finite differences of the oracle."""
    rng = np.random.default_rng(10)
    B, T, S, N, H = 2, 3, 4, 3, 2
    inputs = qkv(rng, B, T, S, N, H)
    shape = DENSE_SHAPES[form](B, T, S, N, H)
    inputs["rel_k"], inputs["rel_v"] = rng.standard_normal(shape), rng.standard_normal(shape)
    assert_grads_match_finite_differences(bk, inputs, rng, mask=rng.random((B, 1, T, S)) < 0.8)


@pytest.mark.parametrize("gemm_rows, huge_bytes", [(2, 1 << 25), (16, 0), (2, 0)])
@pytest.mark.parametrize("form", ["TSNH (seed 1)", "BTSNH (per example)", "1T1NH (broadcast S)"])
def test_torch_dense_head_groups_and_buffers(form, gemm_rows, huge_bytes, monkeypatch):
    """The torch dense path's other branches: several block-diagonal head groups (_GEMM_ROWS = 2 gives
    one head per group) and edge gradients written into NumPy-allocated buffers (_HUGE_BYTES = 0)."""
    pytest.importorskip("torch")
    import relattn_torch.dense

    monkeypatch.setattr(relattn_torch.dense, "_GEMM_ROWS", gemm_rows)
    monkeypatch.setattr(relattn_torch.dense, "_HUGE_BYTES", huge_bytes)
    test_dense_edge_gradients_match_finite_differences(backend("torch"), form)


def test_torch_dense_edge_gradient_buffers_keep_dtype(monkeypatch):
    """Edge gradients written into NumPy-allocated buffers are ordinary tensors of the edges' dtype,
    equal to those from torch-allocated ones."""
    torch = pytest.importorskip("torch")
    import relattn_torch
    import relattn_torch.dense

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(2, 3, 2, 4, generator=g, dtype=dtype) for _ in range(3))
        a_k, a_v = (torch.randn(3, 3, 2, 4, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
        grads = []
        for huge_bytes in (0, 1 << 40):
            monkeypatch.setattr(relattn_torch.dense, "_HUGE_BYTES", huge_bytes)
            a_k.grad = a_v.grad = None
            relattn_torch.relative_attention(q, k, v, a_k, a_v).sum().backward()
            grads.append((a_k.grad, a_v.grad))
        for numpy_grad, torch_grad, a in zip(*grads, (a_k, a_v)):
            assert numpy_grad.dtype == dtype and numpy_grad.shape == a.shape
            assert numpy_grad.abs().sum() > 0 and torch.equal(numpy_grad, torch_grad)


def test_torch_dense_edge_double_backward():
    """The custom autograd functions of relattn_torch.dense are twice differentiable."""
    torch = pytest.importorskip("torch")
    import relattn_torch

    rng = np.random.default_rng(11)
    B, T, S, N, H = 2, 3, 4, 2, 3
    shapes = [(B, T, N, H), (B, S, N, H), (B, S, N, H), (T, S, N, H), (B, T, S, N, H)]
    args = [torch.tensor(rng.standard_normal(s), requires_grad=True) for s in shapes]
    assert torch.autograd.gradgradcheck(lambda *a: relattn_torch.relative_attention(*a), args)


def test_jax_dense_edges_support_forward_mode():
    """jax.jvp through the dense path equals the directional derivative from jax.vjp."""
    jax = pytest.importorskip("jax")
    import relattn_jax

    rng = np.random.default_rng(12)
    B, T, S, N, H = 2, 3, 4, 2, 3
    shapes = [(B, T, N, H), (B, S, N, H), (B, S, N, H), (T, S, N, H), (T, S, N, H)]
    args = [jax.numpy.asarray(rng.standard_normal(s)) for s in shapes]
    tangents = [jax.numpy.asarray(rng.standard_normal(s)) for s in shapes]
    out, jvp = jax.jvp(relattn_jax.relative_attention, args, tangents)
    cot = rng.standard_normal(out.shape)
    _, pullback = jax.vjp(relattn_jax.relative_attention, *args)
    via_vjp = sum(float((g * t).sum()) for g, t in zip(pullback(jax.numpy.asarray(cot)), tangents))
    assert abs(float((jvp * cot).sum()) - via_vjp) <= allowed_error(via_vjp)


def test_no_relative_terms_is_plain_attention(bk):
    rng = np.random.default_rng(1)
    inputs = qkv(rng)
    ref = check(bk, inputs, is_causal=True)
    # and the oracle itself agrees with textbook softmax attention
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    e = np.einsum("btnh,bsnh->bnts", q, k) / 2.0 + np.triu(np.full((5, 5), -np.inf), 1)
    p = np.exp(e - e.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.einsum("bnts,bsnh->btnh", p, v), ref, atol=1e-12)


# --- relation tables -----------------------------------------------------------------------------

@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("batched_ids", [False, True])
@pytest.mark.parametrize("terms", ["both", "keys", "values"])
def test_tables(bk, per_head, batched_ids, terms):
    rng = np.random.default_rng(2)
    B, T, S, N, H, R = 2, 5, 7, 3, 4, 6
    inputs = qkv(rng, B, T, S, N, H)
    table = (R, N, H) if per_head else (R, H)
    if terms in ("both", "keys"):
        inputs["rel_k"] = rng.standard_normal(table)
    if terms in ("both", "values"):
        inputs["rel_v"] = rng.standard_normal(table)
    ids = rng.integers(0, R, (B, T, S) if batched_ids else (T, S))
    check(bk, inputs, rel_ids=ids)


@pytest.mark.parametrize("max_distance", [1, 3, 50])
def test_shaw_ids(bk, max_distance):
    rng = np.random.default_rng(3)
    B, T, N, H = 2, 8, 2, 4
    inputs = qkv(rng, B, T, T, N, H)
    R = 2 * max_distance + 1
    inputs["rel_k"], inputs["rel_v"] = rng.standard_normal((R, H)), rng.standard_normal((R, N, H))
    ids = bk.numpy(bk.lib.relative_position_ids(T, T, max_distance))
    check(bk, inputs, rel_ids=ids, is_causal=True)


# --- masks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,S", [(5, 5), (3, 7), (7, 3), (1, 6)])
@pytest.mark.parametrize("masking", ["padding", "causal", "both"])
def test_masks_and_cross_attention(bk, T, S, masking):
    rng = np.random.default_rng(4)
    B, N, H = 3, 2, 4
    inputs = qkv(rng, B, T, S, N, H)
    inputs["rel_k"], inputs["rel_v"] = rng.standard_normal((T, S, H)), rng.standard_normal((T, S, N, H))
    lengths = np.array([S, max(1, S - 2), 1])
    mask = (np.arange(S)[None, :] < lengths[:, None])[:, None, None, :] if masking != "causal" else None
    check(bk, inputs, mask=mask, is_causal=masking != "padding", scale=0.37)


def test_fully_masked_rows_are_zero_with_finite_grads(bk):
    rng = np.random.default_rng(5)
    B, T, S, N, H, R = 2, 4, 5, 2, 3, 3
    inputs = qkv(rng, B, T, S, N, H)
    inputs["rel_k"], inputs["rel_v"] = rng.standard_normal((R, H)), rng.standard_normal((R, N, H))
    ids = rng.integers(0, R, (T, S))
    mask = np.ones((B, N, T, S), bool)
    mask[0, :, 1] = False  # query 1 of example 0 sees nothing, in every head
    mask[1, 1] = False  # head 1 of example 1 sees nothing at all
    cot = rng.standard_normal((B, T, N, H))
    out, grads = bk.attention_grads(inputs, cot, rel_ids=ids, mask=mask)
    assert_close(out, oracle.relative_attention(**inputs, rel_ids=ids, mask=mask))
    assert np.all(out[0, 1] == 0.0) and np.all(out[1, :, 1] == 0.0)
    for name, g in grads.items():
        assert np.isfinite(g).all(), name
    assert np.all(grads["q"][0, 1] == 0.0) and np.all(grads["q"][1, :, 1] == 0.0)


def test_gradients_match_finite_differences_of_oracle(bk):
    rng = np.random.default_rng(6)
    B, T, S, N, H, R = 1, 3, 4, 2, 3, 5
    inputs = qkv(rng, B, T, S, N, H)
    inputs["rel_k"], inputs["rel_v"] = rng.standard_normal((R, N, H)), rng.standard_normal((R, H))
    assert_grads_match_finite_differences(bk, inputs, rng, rel_ids=oracle.shaw_ids(T, S, 2, 1), is_causal=True)


# --- dtypes ------------------------------------------------------------------------------------

def test_float32_matches_oracle(bk):
    rng = np.random.default_rng(7)
    inputs = {n: x.astype(np.float32) for n, x in qkv(rng, 2, 6, 6, 2, 8).items()}
    inputs["rel_k"] = rng.standard_normal((9, 8)).astype(np.float32)
    inputs["rel_v"] = rng.standard_normal((9, 2, 8)).astype(np.float32)
    ids = oracle.shaw_ids(6, 6, 4)
    out = bk.attention(inputs, rel_ids=ids, is_causal=True)
    assert out.dtype == np.float32
    ref = oracle.relative_attention(**inputs, rel_ids=ids, is_causal=True)
    assert np.abs(out - ref).max() <= 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_masks_give_no_nan(bk, dtype):
    rng = np.random.default_rng(8)
    B, T, N, H = 2, 6, 2, 8
    inputs = qkv(rng, B, T, T, N, H)
    inputs["q"] = inputs["q"] * 8  # large logits: -1e20 or -inf style fills would overflow here
    inputs["rel_k"], inputs["rel_v"] = rng.standard_normal((5, H)), rng.standard_normal((5, H))
    ids = oracle.shaw_ids(T, T, 2)
    mask = np.ones((B, 1, T, T), bool)
    mask[0, 0, 2] = False  # one fully masked row
    out = bk.attention(inputs, dtype=dtype, rel_ids=ids, mask=mask, is_causal=True)
    assert np.isfinite(out).all()
    assert np.all(out[0, 2] == 0.0)
    rounded = {n: bk.numpy(bk.array(x, dtype)).astype(np.float64) for n, x in inputs.items()}
    ref = oracle.relative_attention(**rounded, rel_ids=ids, mask=mask, is_causal=True)
    assert np.abs(out - ref).max() <= allowed_error(ref, 0.05)
