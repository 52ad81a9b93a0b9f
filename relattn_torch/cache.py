"""A key/value cache for autoregressive decoding with relative positions (PyTorch).

The cache holds fixed-size buffers k, v [B, S, N_kv, H] (S = max_length; N_kv the
key/value heads, fewer than the query heads when they are grouped) and the
number of positions already written, ``length``, as a 0-d int64 tensor. Keeping
``length`` a tensor (not a Python int) means ``torch.compile`` sees the same
shapes and no changing constant at every step, so a compiled decode step compiles
once and is reused as the cache fills.

New keys/values go to positions [length, length + T). Queries then attend the whole
buffer under the mask ``j <= i + length`` (causal with ``q_offset = length``), which
also hides the unwritten slots, and use relative ids with ``q_offset = length``:
exactly the ids of a full causal forward over the same sequence.

The twin of ``relattn_jax/cache.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _cache_spec, _spec
from .masks import causal_mask, combine_masks


@dataclass
class KVCache:
    """Keys and values of the positions seen so far.

    Attributes:
        k: keys [B, S, N_kv, H], S = max_length; slots >= length hold stale data.
        v: values [B, S, N_kv, H].
        length: 0-d int64 tensor, the number of positions written.

    ``checked`` (static, set by ``init_kv_cache``) asks for the overflow check inside a
    compiled step too (see ``update_kv_cache``); ``overflowed`` reads ``length > max_length``.

    Updates write into the buffers in place (like a static cache) when autograd is
    not recording, so the returned cache shares them with the old one: the old
    cache still reads its own prefix correctly, but to branch two continuations
    from one cache, ``clone()`` it first. When autograd is recording the write is
    out of place, so gradients through a cached forward stay correct.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: torch.Tensor
    checked: bool = False

    @property
    def max_length(self) -> int:
        return self.k.shape[1]

    @property
    def overflowed(self) -> torch.Tensor:
        """0-d bool tensor: a write went past max_length (no host sync to compute)."""
        return self.length > self.max_length

    def clone(self) -> "KVCache":
        return KVCache(self.k.clone(), self.v.clone(), self.length.clone(), self.checked)


def init_kv_cache(
    batch_size: int, max_length: int, num_heads: int, head_dim: int, *, dtype=None, device=None, checked: bool = False
) -> KVCache:
    """An empty cache with buffers [batch_size, max_length, num_heads, head_dim] of zeros.

    ``checked=True`` keeps the overflow check inside ``torch.compile`` (see ``update_kv_cache``).
    """
    _spec.check_int("batch_size", batch_size)
    _spec.check_int("max_length", max_length)
    if not isinstance(checked, bool):
        raise TypeError(f"checked must be a bool, got {checked!r}")
    shape = (batch_size, max_length, num_heads, head_dim)
    k = torch.zeros(shape, dtype=dtype, device=device)
    return KVCache(k, torch.zeros_like(k), torch.zeros((), dtype=torch.int64, device=k.device), checked)


def update_kv_cache(cache: KVCache, k_new: torch.Tensor, v_new: torch.Tensor) -> KVCache:
    """Write k_new, v_new [B, T, N_kv, H] at positions [length, length + T).

    Raises ValueError on overflow (length + T > max_length) in eager mode. Under
    ``torch.compile`` the length is not read on the host, so by default there is no
    check: ``index_copy_`` then fails with an out-of-range index (on CPU an IndexError,
    or inductor's "index out of bounds" RuntimeError; a device-side assert on CUDA). A ``checked`` cache asserts ``length + T <=
    max_length`` on the device instead (``torch._assert_async``: a RuntimeError whose
    message starts "cache overflow", a device-side assert on CUDA) and clamps the
    write so that the assert is the failure.
    """
    _check_update(cache, k_new, v_new)
    T = k_new.shape[1]
    start = cache.length
    if cache.checked and torch.compiler.is_compiling():
        torch._assert_async(cache.length + T <= cache.max_length, _cache_spec.overflow_message(None, T, cache.max_length))
        start = start.clamp(max=cache.max_length - T)
    idx = start + torch.arange(T, device=cache.k.device)  # [T]
    if torch.is_grad_enabled() and (k_new.requires_grad or v_new.requires_grad):
        k, v = cache.k.index_copy(1, idx, k_new), cache.v.index_copy(1, idx, v_new)
    else:
        k, v = cache.k.index_copy_(1, idx, k_new), cache.v.index_copy_(1, idx, v_new)
    return KVCache(k, v, cache.length + T, cache.checked)


def attend_cache(
    cache: KVCache, k_new: torch.Tensor, v_new: torch.Tensor, mask: torch.Tensor | None, *, num_heads: int | None = None
):
    """Append k_new, v_new [B, T, N_kv, H] and return what attention over the cache needs.

    ``num_heads``: the query heads N that ``mask`` may carry (default N_kv: no grouped heads).

    Returns:
        (k, v, mask, q_offset, new_cache): the buffers k, v [B, S, N_kv, H]; the bool
        mask (user mask AND j <= i + q_offset) broadcastable to [B, N, T, S]; the
        position of the first new query, q_offset = the old length (0-d tensor); and
        the updated cache.
    """
    _check_type(cache)
    if mask is not None:  # before the causal mask is combined in: a wrong mask must not fail in there
        _check_mask(mask, k_new.shape, cache.max_length, num_heads)
    offset = cache.length
    new = update_kv_cache(cache, k_new, v_new)
    visible = causal_mask(k_new.shape[1], cache.max_length, q_offset=offset, device=cache.k.device)  # [T, S]
    return new.k, new.v, combine_masks(mask, visible), offset, new


def _check_mask(mask, new_shape, max_length: int, num_heads: int | None = None) -> None:
    """A bool tensor that broadcasts to [B, N, T, max_length] (messages as ``relative_attention``'s)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__module__}.{type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
    B, T, N_kv, _ = new_shape
    _cache_spec.check_cache_mask(tuple(mask.shape), B, N_kv if num_heads is None else num_heads, T, max_length)


def _check_type(cache) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (from init_cache), got {type(cache).__name__}")


def _check_update(cache: KVCache, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    _check_type(cache)
    _cache_spec.check_cache_buffers(tuple(cache.k.shape), tuple(cache.v.shape), tuple(k_new.shape), cache.max_length)
    if cache.k.dtype != k_new.dtype or cache.v.dtype != v_new.dtype:
        raise TypeError(f"cache dtype must be the keys' dtype {k_new.dtype}, got {cache.k.dtype}")
    if k_new.shape[1] > cache.max_length:  # static: refused even when traced, checked or not
        raise ValueError(_cache_spec.overflow_message(None, k_new.shape[1], cache.max_length))
    if not torch.compiler.is_compiling():
        _cache_spec.check_cache_room(int(cache.length), k_new.shape[1], cache.max_length)
