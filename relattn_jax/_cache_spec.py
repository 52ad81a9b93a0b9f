"""Framework-free checks of the KV cache and of ``generate`` (the decoding twins of ``_spec.py``).

Byte-identical in ``relattn_torch`` and ``relattn_jax`` (a test enforces it), like ``_spec.py``,
whose shape helpers it uses; it works on plain ints and tuples and never imports a framework.
Used by ``cache.py``, ``modules.py``, ``decoder.py`` and ``generate.py``.

Dimension legend: B batch, T new positions, N heads, H head dim, P prompt length.
"""

from __future__ import annotations

import math
import numbers

from ._spec import Shape, check_int, fmt


def check_cache_call(key, value, q_offset) -> None:
    """A cache serves causal self-attention: no separate key/value, no q_offset."""
    if key is not None or value is not None:
        raise ValueError("cache is for self-attention: pass only query (key and value must be None) with cache=")
    if q_offset is not None:
        raise ValueError(f"q_offset must be None with cache= (the cache length is the offset), got {q_offset!r}")


def check_cache_buffers(k_shape: Shape, v_shape: Shape, new_shape: Shape, max_length: int) -> None:
    """Cache buffers must be [B, max_length, N, H] for new keys [B, T, N, H]."""
    B, _, N, H = new_shape
    want = (B, max_length, N, H)
    if tuple(k_shape) != want or tuple(v_shape) != want:
        raise ValueError(
            f"cache buffers must be [B, S, N, H] = {fmt(want)} for this input, "
            f"got k {fmt(k_shape)} and v {fmt(v_shape)}"
        )


def check_cache_room(length: int, new: int, max_length: int) -> None:
    """Writing ``new`` positions after ``length`` must fit in ``max_length``."""
    if length + new > max_length:
        raise ValueError(overflow_message(length, new, max_length))


def overflow_message(length, new: int, max_length: int) -> str:
    """The overflow error; ``length`` None when only the device knows it (a compiled torch step)."""
    have = "the cache length" if length is None else f"cache length {int(length)}"
    return (
        f"cache overflow: {have} + {new} new positions > max_length {max_length}; "
        f"create the cache with a larger max_length"
    )


def check_cache_mask(shape: Shape, batch: int, heads: int, new: int, max_length: int) -> None:
    """With a cache the mask covers the whole buffer: it must broadcast to [B, N, T, max_length]."""
    target = (batch, heads, new, max_length)
    if len(shape) > 4 or not all(s in (1, t) for s, t in zip(reversed(shape), reversed(target))):
        raise ValueError(
            f"mask with cache= covers the cache buffer: it must broadcast to [B, N, T, max_length] = "
            f"{fmt(target)}, got shape {fmt(shape)} (its last dim is the cache's max_length {max_length}, "
            f"not the T = {new} new positions)"
        )


def check_token_range(name: str, lo: int, hi: int, vocab_size) -> None:
    """Token ids (values in [lo, hi]) must index the vocabulary: [0, vocab_size); no upper check if None."""
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bound = "[0, vocab_size)" if vocab_size is None else f"[0, vocab_size) = [0, {vocab_size})"
        raise ValueError(f"{name} must hold token ids in {bound}, got values in [{lo}, {hi}]")


def check_generate_args(B: int, P: int, max_new_tokens, temperature, seed) -> None:
    """generate's framework-free rules: a non-empty prompt [B, P], the step count, temperature, seed."""
    if B < 1 or P < 1:
        raise ValueError(
            f"prompt must hold at least one row and one token (B >= 1, P >= 1: generation continues "
            f"from the last prompt token), got shape [B, P] = [{B}, {P}]"
        )
    check_int("max_new_tokens", max_new_tokens)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number >= 0 (0 = greedy), got {temperature!r}")
    if not 0 <= float(temperature) < math.inf:
        raise ValueError(f"temperature must be >= 0 (0 = greedy) and finite, got {temperature!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
