"""Relative-position bucket schemes: which relation id each (query, key) pair gets (PyTorch).

Dimension legend as in ``attention.py``: T query length, S key length, R relation ids.

Every scheme is a small frozen object with ``num_ids`` (R, the rows of its tables) and
``ids(q_len, k_len, q_offset)`` -> int64 [T, S]. One sign convention throughout: the relative
position of key j seen from query i is

    relative[i, j] = j - (i + q_offset)        (key minus query; q_offset: query 0's key position)

and ``bucket(relative)`` maps it to the row that the model's own table holds for that pair, so a
checkpoint's table is used as it is, never reversed:

- ``ShawBuckets(K)``: clip(relative, -K, K) + K (Shaw et al.; tensor2tensor).
- ``BertBuckets(P)``: BERT's ``relative_key(_query)`` measures query minus key and reads row
  -relative + P - 1 of its ``distance_embedding`` (Shaw's rows mirrored).
- ``T5Buckets``: T5's ``_relative_position_bucket(memory_position - query_position)``; T5's
  relative position is key minus query too.
- ``DebertaBuckets``: DeBERTa-v2 measures query minus key, so its bucket is taken of
  -relative: clamp(make_log_bucket_position(-relative) + span, 0, 2 span - 1), the row its c2p
  gather reads. Its p2c gather reads the same row for the pair (the log bucket is odd in its
  argument), so ``rel_q`` uses the same ids.

The float steps (T5's and DeBERTa's logarithms) run in float32 as those models compute them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import _scheme_spec, _spec

__all__ = ["BertBuckets", "DebertaBuckets", "ShawBuckets", "T5Buckets", "relative_positions", "shaw_rows",
           "shaw_width"]


def relative_positions(q_len: int, k_len: int, q_offset: int | torch.Tensor = 0, *, device=None) -> torch.Tensor:
    """j - (i + q_offset) as int64 [q_len, k_len]: key position minus query position."""
    _spec.check_int("q_len", q_len, minimum=0)
    _spec.check_int("k_len", k_len, minimum=0)
    i = torch.arange(q_len, device=device)[:, None] + q_offset
    j = torch.arange(k_len, device=device)[None, :]
    return j - i


class _Scheme:
    @property
    def num_ids(self) -> int:  # pragma: no cover - each scheme defines it
        raise NotImplementedError

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:  # pragma: no cover - each scheme defines it
        raise NotImplementedError

    @property
    def saturation(self) -> int:
        """W >= 0 with bucket(d) == bucket(W) for every d >= W and bucket(d) == bucket(-W) for every
        d <= -W: beyond distance W the ids are constant on each side (so the scheme is the Shaw
        form with clip W and the expanded tables of ``shaw_rows``)."""
        return _saturation(self)

    def ids(self, q_len: int, k_len: int, q_offset: int | torch.Tensor = 0, *, device=None) -> torch.Tensor:
        """Relation ids [q_len, k_len] (int64, values in [0, num_ids)) for queries at key positions
        q_offset, q_offset + 1, ... and keys at 0, 1, ...

        Args:
            q_len: T, the number of queries.
            k_len: S, the number of keys.
            q_offset: position of query 0 among the keys (int or 0-d integer tensor).
            device: torch device of the result.
        """
        return self.bucket(relative_positions(q_len, k_len, q_offset, device=device))


@dataclass(frozen=True)
class ShawBuckets(_Scheme):
    """Shaw's clipped distances: id = clip(relative, -max_distance, max_distance) + max_distance.

    R = 2 * max_distance + 1. ``relative_position_ids(T, S, K)`` and ``max_distance=K`` are this scheme.
    """

    max_distance: int

    def __post_init__(self):
        _scheme_spec.check_shaw_buckets(self.max_distance)

    @property
    def num_ids(self) -> int:
        return 2 * self.max_distance + 1

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """relative (key minus query, int tensor) -> ids in [0, 2K]."""
        K = self.max_distance
        return relative.clamp(-K, K) + K


@dataclass(frozen=True)
class BertBuckets(_Scheme):
    """BERT's ``relative_key`` / ``relative_key_query`` rows of ``distance_embedding``.

    BERT's distance is query minus key (-relative) and its row is distance + P - 1, with
    P = max_position_embeddings: id = clip(-relative, -(P - 1), P - 1) + P - 1 (BERT itself has
    no row beyond +-(P - 1); here such pairs read the last one). R = 2 P - 1. These are the rows
    of ``ShawBuckets(P - 1)`` mirrored (id = 2 (P - 1) - Shaw id), so BERT's table is used as it is.
    """

    max_position_embeddings: int = 512

    def __post_init__(self):
        _scheme_spec.check_bert_buckets(self.max_position_embeddings)

    @property
    def num_ids(self) -> int:
        return 2 * self.max_position_embeddings - 1

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """relative (key minus query, int tensor) -> ids in [0, 2 P - 1)."""
        K = self.max_position_embeddings - 1
        return K - relative.clamp(-K, K)


@dataclass(frozen=True)
class T5Buckets(_Scheme):
    """T5's buckets, exactly as ``T5Attention._relative_position_bucket`` computes them.

    With relative = key minus query (T5's memory_position - query_position):
    bidirectional (encoder): n = |relative|, half = num_buckets // 2, offset half when relative > 0;
    causal (decoder): n = max(-relative, 0), half = num_buckets, no offset. Then with
    max_exact = half // 2: n itself when n < max_exact, else
    min(max_exact + int(log(n / max_exact) / log(max_distance / max_exact) * (half - max_exact)), half - 1),
    in float32. R = num_buckets (the rows of ``relative_attention_bias``).
    """

    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True

    def __post_init__(self):
        _scheme_spec.check_t5_buckets(self.num_buckets, self.max_distance, self.bidirectional)

    @property
    def num_ids(self) -> int:
        return self.num_buckets

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """relative (key minus query, int tensor) -> ids in [0, num_buckets)."""
        half = self.num_buckets
        out = torch.zeros_like(relative)
        if self.bidirectional:
            half //= 2
            out = out + (relative > 0).to(relative.dtype) * half
            n = relative.abs()
        else:
            n = -torch.clamp(relative, max=0)
        max_exact = half // 2
        scaled = torch.log(n.float() / max_exact) / math.log(self.max_distance / max_exact) * (half - max_exact)
        large = torch.clamp(max_exact + scaled.to(relative.dtype), max=half - 1)
        return out + torch.where(n < max_exact, n, large)


@dataclass(frozen=True)
class DebertaBuckets(_Scheme):
    """DeBERTa-v2/v3's relative positions, exactly as its attention indexes ``rel_embeddings``.

    DeBERTa's delta = query minus key = -relative. With position_buckets > 0 it is log-bucketed
    (``make_log_bucket_position(delta, position_buckets, max_relative_positions)``, float32), and
    span = position_buckets; with position_buckets = 0 (DeBERTa's -1) delta is used as it is and
    span = max_relative_positions. id = clamp(delta + span, 0, 2 span - 1); R = 2 span, the rows
    of ``rel_embeddings`` that the attention uses. ``max_relative_positions`` is the attention's
    resolved value (config.max_position_embeddings when the config says -1).
    """

    position_buckets: int = 256
    max_relative_positions: int = 512

    def __post_init__(self):
        _scheme_spec.check_deberta_buckets(self.position_buckets, self.max_relative_positions)

    @property
    def span(self) -> int:
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @property
    def num_ids(self) -> int:
        return 2 * self.span

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """relative (key minus query, int tensor) -> ids in [0, 2 span)."""
        delta = -relative
        if self.position_buckets > 0:
            delta = _log_bucket(delta, self.position_buckets, self.max_relative_positions)
        return torch.clamp(delta + self.span, 0, 2 * self.span - 1)


def _log_bucket(delta: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """DeBERTa-v2's make_log_bucket_position, in float32, as an int tensor of delta's dtype."""
    sign = torch.sign(delta)
    mid = bucket_size // 2
    abs_pos = torch.where((delta < mid) & (delta > -mid), torch.full_like(delta, mid - 1), delta.abs())
    ratio = torch.log(torch.tensor((max_position - 1) / mid, dtype=torch.float32, device=delta.device))
    log_pos = torch.ceil(torch.log(abs_pos.float() / mid) / ratio * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, delta, (log_pos * sign).to(delta.dtype))


def shaw_width(scheme: _Scheme, q_len: int, k_len: int, q_offset: int | torch.Tensor | None = None) -> int:
    """The smallest Shaw clip K that loses nothing for these sizes: every pair's id is
    scheme.bucket(clip(d, -K, K)) with d = j - i - q_offset.

    That is ``scheme.saturation``, or less when every |d| is below it (an int q_offset; default
    k_len - q_len). With a tensor q_offset the distances are unknown, so it is the saturation.
    """
    W = scheme.saturation
    if isinstance(q_offset, torch.Tensor):
        return W
    q_offset = k_len - q_len if q_offset is None else int(q_offset)
    if q_len == 0 or k_len == 0:
        return 0
    return min(W, max(abs(-(q_len - 1) - q_offset), abs(k_len - 1 - q_offset)))


def shaw_rows(scheme: _Scheme, K: int, *, device=None) -> torch.Tensor:
    """int64 [2K + 1]: rows[d + K] = scheme.bucket(d) for d in [-K, K].

    With K from ``shaw_width``, ``table[shaw_rows(scheme, K)]`` is the scheme's table as a Shaw
    table of clip K (exact; the gather's gradient sums back into the scheme's rows).
    """
    _spec.check_int("K", K, minimum=0)
    return scheme.bucket(torch.arange(-K, K + 1, device=device))


_FAR = 1 << 30  # beyond every scheme's saturation (their sizes are <= 2**20)


@functools.lru_cache(maxsize=None)
def _saturation(scheme: _Scheme) -> int:
    """The smallest W whose ids on both sides equal the far ones (each side is monotone in d)."""
    far = scheme.bucket(torch.tensor([_FAR, -_FAR])).tolist()

    def settled(w: int) -> bool:
        return scheme.bucket(torch.tensor([w, -w])).tolist() == far

    lo, hi = 0, _FAR  # settled(hi) holds
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if settled(mid) else (mid + 1, hi)
    return lo
