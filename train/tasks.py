"""Synthetic sequence tasks generated on the fly from a seed (pure NumPy).

Both trainers draw their batches here, so the JAX and PyTorch runs see identical data.
A batch is ``(tokens, targets, weights)``: int32 [B, T], int32 [B, T], float32 [B, T];
the loss and accuracy count only positions with weight 1.

Tasks (relative position is what matters in each, so a model that learned relative
offsets can run on longer sequences than it was trained on):

- ``copy`` (default): ``SEP x_1..x_L SEP x_1..x_L``, the x distinct tokens; predict the
  second copy. Solved by an induction head (a previous-token head, offset -1, plus a
  content match), which needs no absolute position. T = 2L + 1.
- ``lag``: random tokens; at position t predict the token ``LAG`` positions back
  (t >= LAG). A single fixed relative offset. T = L.
"""

from __future__ import annotations

import numpy as np

SEP = 0
LAG = 3
TASKS = ("copy", "lag")
_STREAMS = {"train": 0, "eval": 1}


def check_task(task: str, length: int, vocab_size: int, max_scale: int = 1) -> None:
    """Raise ValueError if the task cannot be generated at ``length * max_scale``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if length < 1 or (task == "lag" and length <= LAG):
        raise ValueError(f"length must be >= {LAG + 1 if task == 'lag' else 1} for task {task!r}, got {length}")
    longest = length * max_scale
    if task == "copy" and vocab_size - 1 < longest:
        raise ValueError(
            f"vocab_size must be > {longest} (copy draws distinct tokens, L * max eval scale = {longest}), got {vocab_size}"
        )


def seq_len(task: str, length: int) -> int:
    """Model input length T of a task at length L."""
    return 2 * length + 1 if task == "copy" else length


def batch(task: str, *, seed: int, step: int, batch_size: int, length: int, vocab_size: int, split: str = "train"):
    """The batch for ``step`` of a run with ``seed``: a pure function of its arguments.

    Returns:
        tokens int32 [B, T], targets int32 [B, T], weights float32 [B, T].
    """
    check_task(task, length, vocab_size)
    rng = np.random.default_rng([seed, _STREAMS[split], step])
    if task == "copy":
        return _copy(rng, batch_size, length, vocab_size)
    return _lag(rng, batch_size, length, vocab_size)


def _copy(rng, B: int, L: int, V: int):
    x = rng.random((B, V - 1)).argsort(axis=1)[:, :L] + 1  # distinct tokens in [1, V)
    sep = np.full((B, 1), SEP)
    seq = np.concatenate([sep, x, sep, x], axis=1)  # [B, 2L + 2]
    weights = np.zeros((B, 2 * L + 1), np.float32)
    weights[:, L + 1 :] = 1.0  # the targets x_1..x_L of the second copy
    return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32), weights


def _lag(rng, B: int, L: int, V: int):
    tokens = rng.integers(1, V, (B, L))
    targets = np.zeros_like(tokens)
    targets[:, LAG:] = tokens[:, :-LAG]
    weights = np.zeros((B, L), np.float32)
    weights[:, LAG:] = 1.0
    return tokens.astype(np.int32), targets.astype(np.int32), weights
