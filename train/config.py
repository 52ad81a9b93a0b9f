"""The training configuration shared by the JAX and PyTorch trainers, and its CLI.

Framework-free: both trainers read the same dataclass, so one set of flags means the
same run in either framework.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
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
    device: str = "auto"  # auto | cpu | cuda | cuda:<i>
    out_dir: str = "runs/jax"
    log_every: int = 50
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    eval_batches: int = 4
    eval_scales: tuple = (1, 2, 4)
    resume: bool = False
    allow_fresh: bool = False  # with resume: start from step 0 when there is nothing to resume
    overwrite: bool = False  # a fresh run may delete what out_dir holds
    compile: bool = False
    progress: bool = True
    crash_at_step: int = -1  # test hook: SIGKILL this process right after that step
    peer_timeout: int = 300  # seconds a process of a multi-process run waits for the others, then stops
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.eval_scales, list):  # JSON and argparse give lists
            object.__setattr__(self, "eval_scales", tuple(self.eval_scales))
        for name, kind in _KINDS.items():
            _check_kind(name, getattr(self, name), kind)
        scales = self.eval_scales
        if not scales or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
            raise ValueError(f"eval_scales must be one or more integers >= 1, got {self.eval_scales!r}")
        for name, ok, rule in _RULES:
            if not ok(getattr(self, name)):
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads ({self.num_heads}), got {self.embed_dim}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume exclude each other: --overwrite deletes the run --resume continues")
        tasks.check_task(self.task, self.length, self.vocab_size, max(self.eval_scales))

    def decoder_kwargs(self) -> dict:
        """Fields of ``DecoderConfig`` (identical in both packages); max_len covers the longest eval."""
        max_len = tasks.seq_len(self.task, self.length * max(self.eval_scales))
        return dict(vocab_size=self.vocab_size, embed_dim=self.embed_dim, num_heads=self.num_heads,
                    num_layers=self.num_layers, mlp_dim=self.mlp_dim, max_distance=self.max_distance,
                    max_len=max_len, position=self.position)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


_FINITE = math.isfinite
# Field -> rule, checked in this order after the types; the message reads "<name> must be <rule>".
_RULES = [
    ("length", lambda v: v >= 1, ">= 1"),
    ("vocab_size", lambda v: v >= 2, ">= 2"),
    ("position", lambda v: v in ("relative", "absolute"), "'relative' or 'absolute'"),
    ("embed_dim", lambda v: v >= 1, ">= 1"),
    ("num_heads", lambda v: v >= 1, ">= 1"),
    ("num_layers", lambda v: v >= 1, ">= 1"),
    ("mlp_dim", lambda v: v >= 1, ">= 1"),
    ("max_distance", lambda v: v >= 1, ">= 1"),
    ("steps", lambda v: v >= 1, ">= 1"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("lr", lambda v: _FINITE(v) and v > 0, "finite and > 0"),
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("end_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("weight_decay", lambda v: _FINITE(v) and v >= 0, "finite and >= 0"),
    ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("eps", lambda v: _FINITE(v) and v > 0, "finite and > 0"),
    ("clip_norm", lambda v: _FINITE(v) and v > 0, "finite and > 0"),
    ("seed", lambda v: 0 <= v < 2**31, "in [0, 2**31)"),
    ("precision", lambda v: v in ("float32", "float64", "bfloat16"), "float32, float64 or bfloat16"),
    ("device", lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "auto, cpu, cuda or cuda:<index>"),
    ("out_dir", lambda v: v.strip() != "", "a non-empty path"),
    ("log_every", lambda v: v >= 1, ">= 1"),
    ("ckpt_every", lambda v: v >= 1, ">= 1"),
    ("keep_checkpoints", lambda v: v >= 1, ">= 1"),
    ("eval_batches", lambda v: v >= 1, ">= 1"),
    ("peer_timeout", lambda v: v >= 1, ">= 1"),
]


def _kinds() -> dict:
    """Field name -> bool, int, float, str, tuple or dict, from the defaults' types."""
    defaults = TrainConfig.__dataclass_fields__
    return {n: (dict if n == "extra" else type(f.default)) for n, f in defaults.items()}


def _check_kind(name: str, value, kind) -> None:
    """TypeError naming the field unless ``value`` has the field's type (an int is a valid float)."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise TypeError(f"{name} must be {kind.__name__}, got {type(value).__name__} {value!r}")


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
    try:
        return TrainConfig(**args)
    except (TypeError, ValueError) as e:
        parser.error(str(e))  # exits 2 with the usage line and the message naming the field


_KINDS = _kinds()
