"""``DecoderLM`` end to end with one framework installed: forward, KV cache, generate, the weight file.

The cross-framework DecoderLM tests (``test_train.py``, ``test_cache.py``) need both frameworks, so an
environment with one of them, or with the declared floor versions of the jax side (``.ci/run``),
would never build the model: flax's ``nnx.List`` (flax >= 0.12.0) and safetensors' ``TensorSpec``
(>= 0.8.0) are reached only here. Each case runs on the installed frameworks and skips the others.
"""

from __future__ import annotations

import numpy as np
import pytest

from .backends import backend
from .numerics import relative_error

CFG = dict(vocab_size=13, embed_dim=8, num_heads=2, num_layers=2, mlp_dim=16, max_distance=3, max_len=32)
PROMPT = np.array([[1, 5, 2, 7, 3], [4, 4, 9, 0, 6]])
N_NEW = 4


def _decoder(name: str, seed: int, position: str = "relative"):
    """A float64 DecoderLM of the installed framework; different seeds give different weights."""
    b = backend(name)  # skips where the framework is not installed
    cfg = b.lib.DecoderConfig(**CFG, position=position)
    if name == "torch":
        b.torch.manual_seed(seed)
        return b, b.lib.DecoderLM(cfg, dtype=b.torch.float64).eval()
    return b, b.lib.DecoderLM(cfg, param_dtype=b.jnp.float64, rngs=b.nnx.Rngs(seed))


def _logits(b, model, tokens):
    return b.numpy(model(b.array(tokens)))


@pytest.mark.parametrize("position", ["relative", "absolute"])
@pytest.mark.parametrize("name", ["torch", "jax"])
def test_cached_decode_equals_full_forward(name, position):
    b, model = _decoder(name, 0, position)
    tokens = np.concatenate([PROMPT, PROMPT[:, ::-1]], axis=1)  # [2, 10]
    full = _logits(b, model, tokens)
    assert full.shape == (2, 10, CFG["vocab_size"]) and np.isfinite(full).all()
    cache = model.init_cache(2, 10)
    steps = []
    for t0, t1 in ((0, 5), (5, 6), (6, 10)):
        out, cache = model(b.array(tokens[:, t0:t1]), cache=cache)
        steps.append(b.numpy(out))
    assert relative_error(np.concatenate(steps, axis=1), full) <= 1e-12


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_greedy_generate_equals_argmax_of_full_forward(name):
    b, model = _decoder(name, 1)
    new = np.asarray(b.lib.generate(model, b.array(PROMPT), N_NEW))
    seq = PROMPT.copy()
    for _ in range(N_NEW):
        seq = np.concatenate([seq, _logits(b, model, seq)[:, -1:].argmax(-1)], axis=1)
    np.testing.assert_array_equal(new, seq[:, PROMPT.shape[1]:])


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_weight_file_round_trip(name, tmp_path):
    b, source = _decoder(name, 2)
    _, target = _decoder(name, 3)
    tokens = PROMPT
    assert relative_error(_logits(b, target, tokens), _logits(b, source, tokens)) > 1e-3  # different weights
    b.lib.save_weights(source, tmp_path / "lm.safetensors")
    result = b.lib.load_weights(target, tmp_path / "lm.safetensors")
    assert result == ([], [], [])  # nothing missing, unexpected or mismatched
    np.testing.assert_array_equal(_logits(b, target, tokens), _logits(b, source, tokens))
