"""Autoregressive generation with a KV cache: greedy and seeded temperature sampling.

Why this twin differs: a Python loop of jax calls dispatches every op from the host, so the
default loop here is one jitted program (prefill, then a ``lax.scan`` over the decode steps) on
a model split into graph and state; the step is a function of its own (``_decode_step``) so
that both loops share it, and each draw takes the key ``fold_in(key(seed), step)``. The torch
twin runs an eager loop under ``torch.no_grad`` with one seeded ``torch.Generator``.

Works with any NNX model offering ``init_cache(batch_size, max_length, dtype=...)``
and ``model(tokens [B, T], *, cache=...) -> (logits [B, T, V], cache)``, e.g.
``DecoderLM``. The twin of ``relattn_torch/generate.py`` (the same tokens for greedy
decoding with the same weights; sampled tokens differ, the random streams differ).

Two loops give the same tokens: ``loop="scan"`` (default) jits prefill and a
``jax.lax.scan`` over ``_decode_step``, compiled once per prompt shape, number of new
tokens and temperature; ``loop="eager"`` runs the same functions op by op in Python.
The cache has fixed-size buffers, so the scan body (and a jitted ``_decode_step``) is
traced once however full the cache is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from . import _cache_spec, _spec


def generate(
    model,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    prompt_lengths: jax.Array | None = None,
    loop: str = "scan",
) -> jax.Array:
    """Continue ``prompt`` by ``max_new_tokens`` tokens, one cached step at a time.

    Args:
        model: see the module docstring; called as given (use ``.eval()`` or a
            deterministic model: dropout must be off).
        prompt: int tokens [B, P], B >= 1, P >= 1, ids in [0, vocab_size) (the upper
            bound is checked when the model has ``cfg.vocab_size`` or ``vocab_size``).
        max_new_tokens: number of tokens to generate (>= 1).
        temperature: 0 for greedy (argmax); > 0 (finite) samples from softmax(logits / temperature).
        seed: seed of the sampling key, an int in [0, 2**32); step t draws with
            ``fold_in(key(seed), t)``.
        prompt_lengths: int [B], for a batch of right-padded prompts of different
            lengths. The prompts are moved to the right (left padding), the pad slots
            are hidden by a padding mask over the cache and the model is called with
            ``mask=``. Relative positions are shift-invariant, so each row gets exactly
            the tokens it would get alone (needs a relative-position model that
            accepts ``mask=``).
        loop: "scan" (jitted) or "eager".

    Returns:
        int32 [B, max_new_tokens], the new tokens only.

    Raises:
        TypeError, ValueError: naming the argument, before anything is traced or run.
    """
    B, P = _check_args(model, prompt, max_new_tokens, temperature, seed, prompt_lengths, loop)
    prompt = jnp.asarray(prompt)
    mask = None
    if prompt_lengths is not None:
        prompt, mask = left_pad(prompt, prompt_lengths, P + max_new_tokens)
    cache = model.init_cache(B, P + max_new_tokens)
    key = jax.random.key(seed)
    if loop == "scan":
        graphdef, state = nnx.split(model)
        return _generate_jit(graphdef, state, prompt, cache, mask, key, max_new_tokens, float(temperature))
    token, cache = _prefill(model, prompt, cache, key, temperature, mask)
    out = [token]
    for step in range(1, max_new_tokens):
        token, cache = _decode_step(model, token, cache, key, step, temperature, mask)
        out.append(token)
    return jnp.stack(out, axis=1)


def _prefill(model, prompt, cache, key, temperature: float, mask=None):
    """Run the prompt [B, P] through the model; (first new token [B], cache)."""
    logits, cache = _call(model, prompt, cache, mask)
    return sample(logits[:, -1], temperature, jax.random.fold_in(key, 0)), cache


def _decode_step(model, token, cache, key, step, temperature: float, mask=None):
    """One cached step: token [B] at the cache's end -> (next token [B], new cache).

    ``step`` (int or traced) numbers the draw: the key is ``fold_in(key, step)``.
    """
    logits, cache = _call(model, token[:, None], cache, mask)
    return sample(logits[:, -1], temperature, jax.random.fold_in(key, step)), cache


def sample(logits: jax.Array, temperature: float, key: jax.Array) -> jax.Array:
    """Next tokens int32 [B] from logits [B, V]: argmax if temperature == 0, else a draw."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits.astype(jnp.float32) / temperature, axis=-1).astype(jnp.int32)


def left_pad(prompt: jax.Array, lengths: jax.Array, max_length: int):
    """Right-padded prompts [B, P] with ``lengths`` [B] -> (left-padded [B, P], mask [B, 1, 1, max_length]).

    Row b's ``lengths[b]`` tokens move to the end; the mask hides cache slots
    j < P - lengths[b] (the pads) from every query.
    """
    P = prompt.shape[1]
    shift = P - jnp.asarray(lengths, jnp.int32)  # [B]
    src = (jnp.arange(P)[None, :] - shift[:, None]) % P  # [B, P]
    slot = jnp.arange(max_length)
    return jnp.take_along_axis(prompt, src, axis=1), (slot[None, :] >= shift[:, None])[:, None, None, :]


# No donate_argnames: only tokens are returned, so a donated cache would alias nothing;
# inside the scan the cache is loop-carried state that XLA updates with dynamic-update-slice.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature"))
def _generate_jit(graphdef, state, prompt, cache, mask, key, max_new_tokens, temperature):
    token, cache = _prefill(nnx.merge(graphdef, state), prompt, cache, key, temperature, mask)

    def body(carry, step):
        token, cache = carry
        token, cache = _decode_step(nnx.merge(graphdef, state), token, cache, key, step, temperature, mask)
        return (token, cache), token

    _, rest = jax.lax.scan(body, (token, cache), jnp.arange(1, max_new_tokens))  # rest [steps, B]
    return jnp.concatenate([token[:, None], rest.T], axis=1)


def _call(model, tokens, cache, mask):
    return model(tokens, cache=cache) if mask is None else model(tokens, cache=cache, mask=mask)


def _check_args(model, prompt, max_new_tokens, temperature, seed, prompt_lengths, loop) -> tuple[int, int]:
    """Every argument, eagerly (rules and messages as in the torch twin); returns (B, P)."""
    if not hasattr(prompt, "shape") or not hasattr(prompt, "dtype"):
        raise TypeError(f"prompt must be an array of int tokens [B, P], got {type(prompt).__name__}")
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be int tokens [B, P], got shape {_spec.fmt(prompt.shape)} dtype {prompt.dtype}")
    B, P = prompt.shape
    _cache_spec.check_generate_args(B, P, max_new_tokens, temperature, seed)
    if not callable(getattr(model, "init_cache", None)):
        raise TypeError(
            f"model must offer init_cache(batch_size, max_length) and model(tokens, *, cache=...) "
            f"(e.g. DecoderLM), got {type(model).__name__}"
        )
    if loop not in ("scan", "eager"):
        raise ValueError(f"loop must be 'scan' or 'eager', got {loop!r}")
    if not isinstance(prompt, jax.core.Tracer):  # the jitted loop would read ids out of range silently
        _cache_spec.check_token_range("prompt", int(jnp.min(prompt)), int(jnp.max(prompt)), _vocab_size(model))
    if prompt_lengths is not None:
        if not hasattr(prompt_lengths, "dtype") or not jnp.issubdtype(prompt_lengths.dtype, jnp.integer):
            raise TypeError(f"prompt_lengths must be an int array [B], got {_describe(prompt_lengths)}")
        if tuple(prompt_lengths.shape) != (B,):
            raise ValueError(f"prompt_lengths must be [B] = [{B}], got shape {_spec.fmt(prompt_lengths.shape)}")
        if int(jnp.min(prompt_lengths)) < 1 or int(jnp.max(prompt_lengths)) > P:
            raise ValueError(f"prompt_lengths must be in [1, P] = [1, {P}], got {list(map(int, prompt_lengths))}")
    return B, P


def _vocab_size(model):
    """The model's vocabulary size (``cfg.vocab_size`` or ``vocab_size``), or None if it has none."""
    size = getattr(getattr(model, "cfg", None), "vocab_size", None)
    size = getattr(model, "vocab_size", None) if size is None else size
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return type(x).__name__ if shape is None else f"shape {_spec.fmt(shape)} dtype {x.dtype}"
