"""The seeds' code, run as written, is reproduced by relative_attention and RelativeMultiHeadAttention."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from . import seeds  # noqa: E402
from .numerics import assert_close  # noqa: E402


def test_seed1_answer_equals_relative_attention(bk):
    """X [B, S, H, D] with per-head W [H, D, D] and edges A [S, S, H, D], as in the seed."""
    g = torch.Generator().manual_seed(0)
    B, S, Hh, D = 2, 6, 3, 5  # the seed's H is our N (heads), its D our H (head dim)
    X = torch.randn(B, S, Hh, D, generator=g, dtype=torch.float64)
    W_Q, W_K, W_V = (torch.randn(Hh, D, D, generator=g, dtype=torch.float64) for _ in range(3))
    a_K, a_V = (torch.randn(S, S, Hh, D, generator=g, dtype=torch.float64) for _ in range(2))
    expected = seeds.seed1_answer(X, W_Q, W_K, W_V, a_K, a_V).numpy()
    q, k, v = (np.einsum("bshd,hde->bshe", X.numpy(), W.numpy()) for W in (W_Q, W_K, W_V))
    inputs = {"q": q, "k": k, "v": v, "rel_k": a_K.numpy(), "rel_v": a_V.numpy()}
    assert_close(bk.attention(inputs, scale=seeds.seed1_scale(D)), expected)
    # and through the seed-1 layer with the seed's W as its parameters
    layer = bk.module("RelationAwareAttention", Hh, D, scale=seeds.seed1_scale(D))
    bk.set_params(layer, {"w_q": W_Q.numpy(), "w_k": W_K.numpy(), "w_v": W_V.numpy()})
    assert_close(bk.call(layer, X.numpy(), a_K.numpy(), a_V.numpy()), expected)


def _seed2(E=32, N=4, seed=0):
    torch.manual_seed(seed)
    return seeds.MultiHeadAttention(E, N).double()


@pytest.mark.parametrize("masking", ["none", "padding", "causal"])
@pytest.mark.parametrize("T,S", [(6, 6), (3, 5)])
def test_seed2_module_reproduced(bk, masking, T, S):
    E, N, B = 32, 4, 3
    seed = _seed2(E, N)
    rng = np.random.default_rng(1)
    query, key, value = rng.standard_normal((B, T, E)), rng.standard_normal((B, S, E)), rng.standard_normal((B, S, E))
    seed_mask = our_mask = None
    is_causal = False
    if masking == "padding":
        our_mask = (np.arange(S)[None, :] < np.array([S, 2, 1])[:, None])[:, None, None, :]
        seed_mask = torch.from_numpy(our_mask.astype(np.int64))  # the seed wants 0 = masked
    elif masking == "causal":  # bottom-right aligned, as ours; no row is fully masked
        seed_mask = torch.from_numpy(np.tril(np.ones((T, S)), S - T))
        is_causal = True
    with torch.no_grad():
        expected = seed(torch.from_numpy(value), torch.from_numpy(key), torch.from_numpy(query), seed_mask).numpy()
    ours = bk.module("RelativeMultiHeadAttention", E, N, relative_keys=False, relative_values=False,
                     scale=1 / np.sqrt(E))
    bk.set_params(ours, seeds.seed2_params(seed))
    out = bk.call(ours, query, key, value, mask=our_mask, is_causal=is_causal)
    assert_close(out, expected)


def test_seed2_block_diagonal_mapping_is_exact():
    seed = _seed2(16, 2)
    p = seeds.seed2_params(seed)
    W = seed.queries.weight.detach().numpy()
    assert np.array_equal(p["w_q"][0:8, 0], W.T) and np.array_equal(p["w_q"][8:16, 1], W.T)
    assert not p["w_q"][0:8, 1].any() and not p["w_q"][8:16, 0].any()
