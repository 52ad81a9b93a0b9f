"""Boolean attention masks (True = may attend), broadcastable to [B, N, T, S]."""

from __future__ import annotations

import torch


def causal_mask(q_len: int, k_len: int, *, q_offset: int | torch.Tensor | None = None, device=None) -> torch.Tensor:
    """[T, S] bool: key j is visible to query i iff j <= i + q_offset.

    ``q_offset`` defaults to S - T (bottom-right aligned: the queries are the last
    T positions of the keys, as with a KV cache). For T = 3, S = 3::

        [[1, 0, 0],
         [1, 1, 0],
         [1, 1, 1]]

    Args:
        q_len: T, the number of queries.
        k_len: S, the number of keys.
        q_offset: position of query 0 among the keys (int or 0-d integer tensor);
            default S - T.
        device: torch device of the result (default: the current default).

    Returns:
        bool [T, S]; True where the query may attend the key.
    """
    offset = k_len - q_len if q_offset is None else q_offset
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + offset


def padding_mask(lengths: torch.Tensor, k_len: int) -> torch.Tensor:
    """[B, 1, 1, S] bool: key j of example b is visible iff j < lengths[b].

    Args:
        lengths: int [B], the number of valid (leading) keys of each example.
        k_len: S, the number of keys.

    Returns:
        bool [B, 1, 1, S], broadcastable against [B, N, T, S] logits.
    """
    j = torch.arange(k_len, device=lengths.device)
    return (j[None, :] < lengths[:, None])[:, None, None, :]


def combine_masks(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """Logical AND of the masks that are not None.

    Args:
        *masks: bool masks broadcastable to one shape (e.g. [B, N, T, S]), or None.

    Returns:
        Their broadcast AND, or None if every mask is None.
    """
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out
