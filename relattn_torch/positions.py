"""Shaw-style clipped relative-position ids."""

from __future__ import annotations

import torch

from . import _spec


def relative_position_ids(
    q_len: int, k_len: int, max_distance: int, *, q_offset: int | torch.Tensor = 0, device=None
) -> torch.Tensor:
    """Relation ids for relative positions, clipped at +-max_distance.

    Entry [i, j] is clip(j - (i + q_offset), -max_distance, max_distance) + max_distance,
    an int64 tensor [q_len, k_len] with values in [0, 2 * max_distance]. The
    tensor2tensor convention (key minus query). For q_len = k_len = 3, max_distance = 1::

        [[1, 2, 2],
         [0, 1, 2],
         [0, 0, 1]]
    """
    _spec.check_positions(q_len, k_len, max_distance)
    i = torch.arange(q_len, device=device)[:, None] + q_offset
    j = torch.arange(k_len, device=device)[None, :]
    return (j - i).clamp(-max_distance, max_distance) + max_distance
