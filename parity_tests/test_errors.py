"""Bad input raises ValueError/TypeError naming the argument with expected and actual shape/dtype."""

from __future__ import annotations

import numpy as np
import pytest

from .backends import backend


B, T, S, N, H = 2, 3, 4, 2, 5


def call(bk, q=(B, T, N, H), k=(B, S, N, H), v=(B, S, N, H), rel_k=None, rel_v=None, rel_ids=None,
         mask=None, dtype=None, **kw):
    rng = np.random.default_rng(0)
    arr = lambda shape: None if shape is None else rng.standard_normal(shape)  # noqa: E731
    inputs = {"q": arr(q), "k": arr(k), "v": arr(v), "rel_k": arr(rel_k), "rel_v": arr(rel_v)}
    if dtype is not None:
        inputs = {n: (None if x is None else bk.array(x, dtype[n]) if n in dtype else bk.array(x))
                  for n, x in inputs.items()}
        return bk.lib.relative_attention(**inputs, rel_ids=rel_ids, mask=mask, **kw)
    return bk.attention(inputs, rel_ids=rel_ids, mask=mask, **kw)


@pytest.mark.parametrize("args,match", [
    (dict(q=(B, T, N * H)), r"q must have 4 dims \[B, T, N, H\], got shape \[2, 3, 10\]"),
    (dict(k=(B, S, N, H + 1), v=(B, S, N, H + 1)), r"k must be \[B, S, N, H\] = \[2, S, 2, 5\].*got \[2, 4, 2, 6\]"),
    (dict(k=(B + 1, S, N, H), v=(B + 1, S, N, H)), r"k must be .*got \[3, 4, 2, 5\]"),
    (dict(v=(B, S + 1, N, H)), r"k and v must have the same shape.*k \[2, 4, 2, 5\] and v \[2, 5, 2, 5\]"),
    (dict(rel_k=(T, S)), r"rel_k \(dense edges\) must be \[T, S, H\] = \[3, 4, 5\].*got shape \[3, 4\]"),
    (dict(rel_v=(T, S + 1, H)), r"rel_v \(dense edges\).*got shape \[3, 5, 5\]: dim S is 5, expected 4"),
    (dict(rel_k=(B, T, S, N, H + 1)), r"rel_k \(dense edges\).*dim H is 6, expected 5"),
    (dict(rel_k=(5, H + 1), rel_ids=np.zeros((T, S), np.int64)),
     r"rel_k \(relation table, since rel_ids is given\) must be \[R, H\] = \[R, 5\].*got shape \[5, 6\]"),
    (dict(rel_v=(5, N + 1, H), rel_ids=np.zeros((T, S), np.int64)), r"rel_v \(relation table.*\[R, 2, 5\].*\[5, 3, 5\]"),
    (dict(rel_k=(5, H), rel_ids=np.zeros((T, S + 1), np.int64)),
     r"rel_ids must be \[T, S\] = \[3, 4\] or \[B, T, S\] = \[2, 3, 4\], got shape \[3, 5\]"),
    (dict(rel_k=(5, H), rel_ids=np.full((T, S), 5)), r"rel_ids values must be in \[0, R\) = \[0, 5\) for rel_k.*\[5, 5\]"),
    (dict(rel_v=(5, H), rel_ids=np.full((T, S), -1)), r"rel_ids values must be in \[0, R\) = \[0, 5\) for rel_v.*\[-1, -1\]"),
    (dict(rel_ids=np.zeros((T, S), np.int64)), r"rel_ids was given but both rel_k and rel_v are None"),
    (dict(mask=np.ones((B, N, T, S + 1), bool)), r"mask must broadcast to \[B, N, T, S\] = \[2, 2, 3, 4\], got shape \[2, 2, 3, 5\]"),
    (dict(mask=np.ones((1, B, N, T, S), bool)), r"mask must broadcast to .*got shape \[1, 2, 2, 3, 4\]"),
])
def test_value_errors(bk, args, match):
    with pytest.raises(ValueError, match=match):
        call(bk, **args)


@pytest.mark.parametrize("args,match", [
    (dict(rel_k=(5, H), rel_ids=np.zeros((T, S), np.float64)), r"rel_ids must be an integer (tensor|array), got dtype .*float64"),
    (dict(mask=np.ones((T, S), np.int64)), r"mask must be a bool (tensor|array) \(True = may attend\), got dtype .*int64"),
])
def test_type_errors(bk, args, match):
    with pytest.raises(TypeError, match=match):
        call(bk, **args)


def test_dtype_mismatch_errors(bk):
    with pytest.raises(TypeError, match=r"k must have the same dtype as q \(.*float64\), got .*float32"):
        call(bk, dtype={"k": "float32"})
    with pytest.raises(TypeError, match=r"rel_k must have the same dtype as q .*got .*float32"):
        call(bk, rel_k=(T, S, H), dtype={"rel_k": "float32"})
    with pytest.raises(TypeError, match=r"q must be a floating dtype, got .*int"):
        call(bk, dtype={"q": "int32", "k": "int32", "v": "int32"})


def test_position_and_module_argument_errors(bk):
    with pytest.raises(ValueError, match=r"max_distance must be a non-negative int, got -1"):
        bk.lib.relative_position_ids(3, 3, -1)
    with pytest.raises(ValueError, match=r"q_len must be a non-negative int, got 2.5"):
        bk.lib.relative_position_ids(2.5, 3, 1)
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(3\)"):
        bk.module("RelativeMultiHeadAttention", 10, 3)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 0"):
        bk.module("RelativeMultiHeadAttention", 10, 0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        bk.module("RelativeMultiHeadAttention", 8, 2, dropout=1.5)
    with pytest.raises(ValueError, match=r"max_distance must be a non-negative int, got -2"):
        bk.module("RelativeMultiHeadAttention", 8, 2, max_distance=-2)
    m = bk.module("RelativeMultiHeadAttention", 10, 3, head_dim=4)  # explicit head_dim needs no divisibility
    assert bk.params(m)["w_q"].shape == (10, 3, 4)


def test_module_input_errors(bk):
    m = bk.module("RelativeMultiHeadAttention", 8, 2)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"query must be \[B, L, E\] = \[B, L, 8\], got shape \[2, 3, 7\]"):
        bk.call(m, rng.standard_normal((2, 3, 7)))
    with pytest.raises(ValueError, match=r"key must be \[B, L, E\] = \[2, L, 8\], got shape \[3, 4, 8\]"):
        bk.call(m, rng.standard_normal((2, 3, 8)), rng.standard_normal((3, 4, 8)))
    with pytest.raises(ValueError, match=r"value must have the shape of key \[2, 4, 8\], got \[2, 5, 8\]"):
        bk.call(m, rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 5, 8)))
    with pytest.raises(ValueError, match=r"mask must broadcast to \[B, N, T, S\] = \[2, 2, 3, 3\]"):
        bk.call(m, rng.standard_normal((2, 3, 8)), mask=np.ones((2, 3, 3, 3), bool))
    ra = bk.module("RelationAwareAttention", 2, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, S, N, H\] = \[B, S, 2, 4\], got shape \[1, 3, 2, 5\]"):
        bk.call(ra, rng.standard_normal((1, 3, 2, 5)))


def test_module_dtype_errors():
    bk = backend("torch")
    m = bk.module("RelativeMultiHeadAttention", 8, 2, dtype="float32")
    x = bk.torch.zeros(1, 3, 8, dtype=bk.torch.float64)
    with pytest.raises(TypeError, match=r"query must have the parameters' dtype torch.float32, got torch.float64"):
        m(x)
    jb = backend("jax")
    mj = jb.module("RelativeMultiHeadAttention", 8, 2)
    with pytest.raises(TypeError, match=r"query must be a floating array, got dtype int"):
        mj(jb.jnp.zeros((1, 3, 8), jb.jnp.int32))


def test_jax_dropout_without_rngs_errors():
    jb = backend("jax")
    m = jb.lib.RelativeMultiHeadAttention(8, 2, dropout=0.1, rngs=jb.nnx.Rngs(params=0))
    assert m.rngs is None  # no dropout stream to keep: rngs must come with the call
    with pytest.raises(ValueError, match=r"dropout is active but no rngs were given"):
        m(jb.jnp.zeros((1, 3, 8)))
