"""The training configuration shared by the JAX and PyTorch trainers, and its CLI.

Framework-free: both trainers read the same dataclass, so one set of flags means the
same run in either framework.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from . import tasks


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. ``length`` is the task's training length L
    (copy: tokens to copy; lag: sequence length); evaluation runs at L * each of ``eval_scales``."""

    task: str = "copy"
    length: int = 8
    vocab_size: int = 40
    position: str = "relative"
    embed_dim: int = 64
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int = 256
    max_distance: int = 2  # < L, else 'attend to offset L' solves copy without induction
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    clip_norm: float = 1.0
    seed: int = 0
    precision: str = "float32"
    out_dir: str = "runs/jax"
    log_every: int = 50
    ckpt_every: int = 200
    eval_batches: int = 4
    eval_scales: tuple = (1, 2, 4)
    resume: bool = False
    compile: bool = False
    progress: bool = True
    crash_at_step: int = -1  # test hook: SIGKILL this process right after that step
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        tasks.check_task(self.task, self.length, self.vocab_size, max(self.eval_scales))
        if self.precision not in ("float32", "float64", "bfloat16"):
            raise ValueError(f"precision must be float32, float64 or bfloat16, got {self.precision!r}")
        if self.position not in ("relative", "absolute"):
            raise ValueError(f"position must be 'relative' or 'absolute', got {self.position!r}")
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def decoder_kwargs(self) -> dict:
        """Fields of ``DecoderConfig`` (identical in both packages); max_len covers the longest eval."""
        max_len = tasks.seq_len(self.task, self.length * max(self.eval_scales))
        return dict(vocab_size=self.vocab_size, embed_dim=self.embed_dim, num_heads=self.num_heads,
                    num_layers=self.num_layers, mlp_dim=self.mlp_dim, max_distance=self.max_distance,
                    max_len=max_len, position=self.position)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def decays(name: str) -> bool:
    """Weight decay applies to kernels, embeddings and tables, not to biases or LayerNorm.

    ``name`` is a canonical parameter name ("blocks.0.attn.b_q") or its last part.
    """
    leaf = name.rsplit(".", 1)[-1]
    return not (leaf.startswith("b_") or leaf in ("scale", "bias"))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup from 0 to ``lr``, then cosine decay to ``lr * end_lr_ratio`` at ``steps``.

    The same numbers as ``optax.warmup_cosine_decay_schedule`` (the JAX trainer uses
    optax itself; the PyTorch twin calls this).
    """
    import math

    peak, end = cfg.lr, cfg.lr * cfg.end_lr_ratio
    if step < cfg.warmup_steps:
        return peak * step / cfg.warmup_steps
    decay = max(cfg.steps - cfg.warmup_steps, 1)
    frac = min(step - cfg.warmup_steps, decay) / decay
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


def parse_args(argv=None, *, prog="python -m train", defaults: dict | None = None) -> TrainConfig:
    """Build a ``TrainConfig`` from ``--flag value`` arguments (one flag per field)."""
    parser = argparse.ArgumentParser(prog=prog, description="Train the toy relative-attention decoder.")
    base = dataclasses.replace(TrainConfig(), **(defaults or {}))
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("extra", "crash_at_step"):
            continue
        value = getattr(base, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(value))
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--crash-at-step", type=int, default=-1, help=argparse.SUPPRESS)
    args = vars(parser.parse_args(argv))
    args["eval_scales"] = tuple(args["eval_scales"])
    return TrainConfig(**args)
