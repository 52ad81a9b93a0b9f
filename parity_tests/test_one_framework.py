"""``DecoderLM`` end to end with one framework installed: forward, KV cache, generate, the weight file.

The cross-framework DecoderLM tests (``test_train.py``, ``test_cache.py``) need both frameworks, so an
environment with one of them, or with the declared floor versions of the jax side (``.ci/run``),
would never build the model: flax's ``nnx.List`` (flax >= 0.12.0) and safetensors' ``TensorSpec``
(>= 0.8.0) are reached only here. Each case runs on the installed frameworks and skips the others.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from .backends import backend
from .numerics import relative_error

CFG = dict(vocab_size=13, embed_dim=8, num_heads=2, num_layers=2, mlp_dim=16, max_distance=3, max_len=32)
PROMPT = np.array([[1, 5, 2, 7, 3], [4, 4, 9, 0, 6]])
N_NEW = 4
T = PROMPT.shape[1] + N_NEW  # every full forward runs on [2, T]: one JAX compile shared by the tests


def _decoder(name: str, seed: int):
    """A float64 DecoderLM of the installed framework; different seeds give different weights."""
    b = backend(name)  # skips where the framework is not installed
    cfg = b.lib.DecoderConfig(**CFG)
    if name == "torch":
        b.torch.manual_seed(seed)
        return b, b.lib.DecoderLM(cfg, dtype=b.torch.float64).eval()
    return b, b.lib.DecoderLM(cfg, param_dtype=b.jnp.float64, rngs=b.nnx.Rngs(seed))


@functools.lru_cache(maxsize=None)
def _calls(name: str):
    """(forward, cached step) of a model; jitted once per process for JAX (compiling op by op is slower)."""
    if name == "torch":
        return (lambda m, t: m(t)), (lambda m, t, c: m(t, cache=c))
    nnx = backend(name).nnx
    return nnx.jit(lambda m, t: m(t)), nnx.jit(lambda m, t, c: m(t, cache=c))


def _logits(b, model, tokens):
    return b.numpy(_calls(b.name)[0](model, b.array(tokens)))


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_cached_decode_equals_full_forward(name):
    b, model = _decoder(name, 0)
    tokens = np.concatenate([PROMPT, PROMPT[:, :N_NEW]], axis=1)  # [2, T]
    full = _logits(b, model, tokens)
    assert full.shape == (2, T, CFG["vocab_size"]) and np.isfinite(full).all()
    cache, steps = model.init_cache(2, T), []
    for t0, t1 in ((0, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9)):  # a prefill of 4, then one at a time
        out, cache = _calls(name)[1](model, b.array(tokens[:, t0:t1]), cache)
        steps.append(b.numpy(out))
    assert relative_error(np.concatenate(steps, axis=1), full) <= 1e-12


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_greedy_generate_equals_argmax_of_full_forward(name):
    """generate's tokens are the argmax of a full causal forward over the sequence so far (the slots
    not yet generated hold 0: causality keeps them out of the earlier logits)."""
    b, model = _decoder(name, 1)
    new = np.asarray(b.lib.generate(model, b.array(PROMPT), N_NEW))
    P = PROMPT.shape[1]
    seq = np.concatenate([PROMPT, np.zeros((2, N_NEW), PROMPT.dtype)], axis=1)
    for t in range(P, T):
        seq[:, t] = _logits(b, model, seq)[:, t - 1].argmax(-1)
    np.testing.assert_array_equal(new, seq[:, P:])


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_weight_file_round_trip(name, tmp_path):
    b, source = _decoder(name, 2)
    _, target = _decoder(name, 3)
    tokens = np.concatenate([PROMPT, PROMPT[:, :N_NEW]], axis=1)
    assert relative_error(_logits(b, target, tokens), _logits(b, source, tokens)) > 1e-3  # different weights
    b.lib.save_weights(source, tmp_path / "lm.safetensors")
    result = b.lib.load_weights(target, tmp_path / "lm.safetensors")
    assert result == ([], [], [])  # nothing missing, unexpected or mismatched
    np.testing.assert_array_equal(_logits(b, target, tokens), _logits(b, source, tokens))
