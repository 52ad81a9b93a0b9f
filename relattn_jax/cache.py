"""A key/value cache for autoregressive decoding with relative positions (JAX).

The cache is a pytree of fixed-size buffers k, v [B, S, N_kv, H] (S = max_length; N_kv the
key/value heads, fewer than the query heads when they are grouped) and
the number of positions already written, ``length``, as an int32 scalar array.
Every decode step sees the same shapes and dtypes, so a jitted step (or the body of
a ``jax.lax.scan``/``fori_loop``) is traced and compiled once and never again as the
cache fills. Updates are functional (``lax.dynamic_update_slice``); donate the cache
to ``jax.jit`` to let XLA write in place.

New keys/values go to positions [length, length + T). Queries then attend the whole
buffer under the mask ``j <= i + length`` (causal with ``q_offset = length``), which
also hides the unwritten slots, and use relative ids with ``q_offset = length``:
exactly the ids of a full causal forward over the same sequence.

The twin of ``relattn_torch/cache.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from . import _cache_spec, _spec
from .masks import causal_mask, combine_masks


@struct.dataclass
class KVCache:
    """Keys and values of the positions seen so far (a pytree).

    Attributes:
        k: keys [B, S, N_kv, H], S = max_length; slots >= length hold stale data.
        v: values [B, S, N_kv, H].
        length: int32 scalar array, the number of positions written.
        checked: static (not a pytree leaf): check for overflow inside ``jit`` too
            (see ``update_kv_cache``).

    ``overflowed`` reads ``length > max_length``: after a jitted loop on an unchecked
    cache it tells whether a write was clamped.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array
    checked: bool = struct.field(pytree_node=False, default=False)

    @property
    def max_length(self) -> int:
        return self.k.shape[1]

    @property
    def overflowed(self) -> jax.Array:
        """bool scalar array: a write went past max_length (the length keeps counting)."""
        return self.length > self.max_length

    def clone(self) -> "KVCache":
        """The same cache (JAX arrays are immutable); for symmetry with PyTorch."""
        return self


def init_kv_cache(
    batch_size: int, max_length: int, num_heads: int, head_dim: int, *, dtype=jnp.float32, checked: bool = False
) -> KVCache:
    """An empty cache with buffers [batch_size, max_length, num_heads, head_dim] of zeros.

    ``checked=True`` keeps the overflow check inside ``jit`` (see ``update_kv_cache``).
    """
    _spec.check_int("batch_size", batch_size)
    _spec.check_int("max_length", max_length)
    if not isinstance(checked, bool):
        raise TypeError(f"checked must be a bool, got {checked!r}")
    k = jnp.zeros((batch_size, max_length, num_heads, head_dim), dtype)
    return KVCache(k, jnp.zeros_like(k), jnp.zeros((), jnp.int32), checked)


def update_kv_cache(cache: KVCache, k_new: jax.Array, v_new: jax.Array) -> KVCache:
    """Write k_new, v_new [B, T, N_kv, H] at positions [length, length + T).

    Raises ValueError on overflow (length + T > max_length) when the length is
    concrete (eager mode). Under ``jit``/``scan`` the length is traced, so by default
    there is no check: ``dynamic_update_slice`` then clamps the start so the write
    fits, silently overwriting the last slots with wrong positions (``overflowed``
    becomes True). A ``checked`` cache checks on the host through
    ``jax.debug.callback``: the jitted call fails with a ``JaxRuntimeError`` (a
    RuntimeError) whose message holds the eager "cache overflow: ..." text.
    """
    _check_update(cache, k_new, v_new)
    if cache.checked and isinstance(cache.length, jax.core.Tracer):
        jax.debug.callback(functools.partial(_check_room, new=k_new.shape[1], max_length=cache.max_length),
                           cache.length)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, cache.length.astype(jnp.int32), zero, zero)
    k = jax.lax.dynamic_update_slice(cache.k, k_new, start)
    v = jax.lax.dynamic_update_slice(cache.v, v_new, start)
    return KVCache(k, v, (cache.length + k_new.shape[1]).astype(jnp.int32), cache.checked)


def attend_cache(
    cache: KVCache, k_new: jax.Array, v_new: jax.Array, mask: jax.Array | None, *, num_heads: int | None = None
):
    """Append k_new, v_new [B, T, N_kv, H] and return what attention over the cache needs.

    ``num_heads``: the query heads N that ``mask`` may carry (default N_kv: no grouped heads).

    Returns:
        (k, v, mask, q_offset, new_cache): the buffers k, v [B, S, N_kv, H]; the bool
        mask (user mask AND j <= i + q_offset) broadcastable to [B, N, T, S]; the
        position of the first new query, q_offset = the old length (scalar array);
        and the updated cache.
    """
    _check_type(cache)
    if mask is not None:  # before the causal mask is combined in: a wrong mask must not fail in there
        mask = _check_mask(mask, k_new.shape, cache.max_length, num_heads)
    offset = cache.length
    new = update_kv_cache(cache, k_new, v_new)
    visible = causal_mask(k_new.shape[1], cache.max_length, q_offset=offset)  # [T, S]
    return new.k, new.v, combine_masks(mask, visible), offset, new


def _check_room(length, *, new: int, max_length: int) -> None:
    """Host side of a checked, traced update (runs with the concrete length)."""
    _cache_spec.check_cache_room(int(length), new, max_length)


def _check_mask(mask, new_shape, max_length: int, num_heads: int | None = None) -> jax.Array:
    """A bool array that broadcasts to [B, N, T, max_length] (messages as ``relative_attention``'s)."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a bool array (True = may attend), got dtype {mask.dtype}")
    B, T, N_kv, _ = new_shape
    _cache_spec.check_cache_mask(tuple(mask.shape), B, N_kv if num_heads is None else num_heads, T, max_length)
    return mask


def _check_type(cache) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (from init_cache), got {type(cache).__name__}")


def _check_update(cache: KVCache, k_new: jax.Array, v_new: jax.Array) -> None:
    _check_type(cache)
    _cache_spec.check_cache_buffers(tuple(cache.k.shape), tuple(cache.v.shape), tuple(k_new.shape), cache.max_length)
    if cache.k.dtype != k_new.dtype or cache.v.dtype != v_new.dtype:
        raise TypeError(f"cache dtype must be the keys' dtype {k_new.dtype}, got {cache.k.dtype}")
    if k_new.shape[1] > cache.max_length:  # static: refused even when traced, checked or not
        raise ValueError(_cache_spec.overflow_message(None, k_new.shape[1], cache.max_length))
    if not isinstance(cache.length, jax.core.Tracer):
        _cache_spec.check_cache_room(int(cache.length), k_new.shape[1], cache.max_length)
