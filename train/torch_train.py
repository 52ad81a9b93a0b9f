"""The PyTorch twin of ``jax_train``: same task batches, model, schedule, clipping and AdamW.

Eager by default, ``--compile`` wraps the model in ``torch.compile``. Under ``torchrun``
(``WORLD_SIZE`` set) it runs DistributedDataParallel with gloo on CPU (nccl on CUDA):
every rank draws the global batch and trains on its own rows; DDP averages the gradients.

AdamW is ``torch.optim.AdamW`` (eps outside the square root, bias-corrected moments,
decoupled decay p <- p - lr * wd * p), the learning rate is set every step from
``config.lr_at`` (optax's warmup-cosine numbers), and clipping is written out to
match ``optax.clip_by_global_norm`` exactly (torch's ``clip_grad_norm_`` adds 1e-6).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import tasks
from .config import TrainConfig, decays, lr_at
from .report import MetricsLog, progress


def build_model(cfg: TrainConfig, *, device=None):
    from relattn_torch.decoder import DecoderConfig, DecoderLM

    if cfg.precision == "bfloat16":
        raise ValueError("precision 'bfloat16' is offered by the JAX trainer only; use float32 or float64 here")
    dtype = torch.float64 if cfg.precision == "float64" else torch.float32
    torch.manual_seed(cfg.seed)
    return DecoderLM(DecoderConfig(**cfg.decoder_kwargs()), device=device, dtype=dtype)


def make_optimizer(cfg: TrainConfig, model) -> torch.optim.AdamW:
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if decays(n)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr_at(cfg, 0), betas=(cfg.b1, cfg.b2), eps=cfg.eps, foreach=False)


def clip_by_global_norm_(params, max_norm: float) -> torch.Tensor:
    """Scale gradients by max_norm / norm when norm >= max_norm (optax's rule, no epsilon)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    if norm >= max_norm:
        for g in grads:
            g.div_(norm).mul_(max_norm)
    return norm


def loss_fn(model, tokens, targets, weights):
    """Masked mean cross-entropy and accuracy over the positions with weight 1."""
    logits = model(tokens)  # [B, T, V]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), reduction="none").view_as(weights)
    total = weights.sum()
    loss = (ce * weights).sum() / total
    acc = ((logits.argmax(-1) == targets) * weights).sum() / total
    return loss, acc.detach()


class Trainer:
    def __init__(self, cfg: TrainConfig):
        import torch.distributed as dist

        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size must be divisible by WORLD_SIZE {self.world}, got {cfg.batch_size}")
        self.model = build_model(cfg, device=self.device)
        self.optimizer = make_optimizer(cfg, self.model)
        self.float_dtype = torch.float64 if cfg.precision == "float64" else torch.float32
        net = self.model
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(net)
        self.net = torch.compile(net) if cfg.compile else net

    def to_device(self, tokens, targets, weights, *, shard: bool = True):
        rows = slice(None)
        if shard and self.world > 1:
            b = tokens.shape[0] // self.world
            rows = slice(self.rank * b, (self.rank + 1) * b)
        tokens, targets = torch.from_numpy(tokens[rows]), torch.from_numpy(targets[rows])
        weights = torch.from_numpy(weights[rows]).to(self.float_dtype)
        return tokens.to(self.device), targets.to(self.device), weights.to(self.device)

    def step(self, step: int, data=None):
        cfg = self.cfg
        if data is None:
            data = tasks.batch(cfg.task, seed=cfg.seed, step=step, batch_size=cfg.batch_size, length=cfg.length,
                               vocab_size=cfg.vocab_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        self.net.train()
        loss, acc = loss_fn(self.net, *self.to_device(*data))
        loss.backward()
        clip_by_global_norm_(self.model.parameters(), cfg.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), acc

    def global_mean(self, *values):
        """Average scalars over DDP ranks (each rank's loss covers its own rows)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        stacked = torch.stack([v.detach().to(self.float_dtype) for v in values])
        dist.all_reduce(stacked)
        return tuple(stacked / self.world)

    @torch.no_grad()
    def evaluate(self, length: int) -> dict:
        cfg, hits, count, exact = self.cfg, 0.0, 0.0, 0
        self.model.eval()
        for i in range(cfg.eval_batches):
            data = tasks.batch(cfg.task, seed=cfg.seed, step=i, batch_size=cfg.batch_size, length=length,
                               vocab_size=cfg.vocab_size, split="eval")
            tokens, targets, weights = self.to_device(*data, shard=False)
            correct = (self.model(tokens).argmax(-1) == targets) * weights
            hits, count = hits + float(correct.sum()), count + float(weights.sum())
            exact += int((correct.sum(-1) == weights.sum(-1)).sum())
        return {"length": length, "T": tasks.seq_len(cfg.task, length), "token_acc": hits / count,
                "seq_acc": exact / (cfg.eval_batches * cfg.batch_size)}

    # -- checkpoints: {weights, optimizer, config, step}, written atomically ----

    def ckpt_path(self) -> Path:
        return Path(self.cfg.out_dir, "checkpoints", "torch_state.pt")

    def save(self, step: int) -> None:
        if self.rank:
            return
        path = self.ckpt_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                 "config": self.cfg.to_json()}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash leaves the previous checkpoint intact

    def restore(self) -> int:
        path = self.ckpt_path()
        if not path.exists():
            return 0
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; evaluate at L * eval_scales; write metrics, plot, weights."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg)
    start = trainer.restore() if cfg.resume else 0
    log = MetricsLog(out / "metrics.jsonl", keep_until=start) if trainer.rank == 0 else None
    tokens_per_step = cfg.batch_size * tasks.seq_len(cfg.task, cfg.length)
    bar = progress(cfg, start, "torch") if trainer.rank == 0 else progress(_quiet(cfg), start, "torch")
    last, t0, since = {}, time.perf_counter(), start
    for step in range(start, cfg.steps):
        loss, acc = trainer.step(step)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            loss, acc = trainer.global_mean(loss, acc)
            dt = time.perf_counter() - t0
            last = {"step": done, "loss": float(loss), "acc": float(acc),
                    "tokens_per_s": tokens_per_step * (done - since) / dt}
            if log:
                log.write(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['acc']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            t0, since = time.perf_counter(), done
        bar.update(1)
        if done % cfg.ckpt_every == 0 and done < cfg.steps:
            trainer.save(done)
        if done == cfg.crash_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    trainer.save(cfg.steps)
    return finish(trainer, last, out)


def finish(trainer: Trainer, last: dict, out: Path) -> dict:
    from relattn_torch.weights import save_weights

    from .report import write_eval

    cfg = trainer.cfg
    rows = [trainer.evaluate(cfg.length * s) for s in cfg.eval_scales]
    summary = {"final": last, "eval": rows, "out_dir": str(out), "world_size": trainer.world}
    if trainer.rank == 0:
        save_weights(trainer.model, out / "weights.safetensors")
        write_eval(out, cfg, rows, framework="torch")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _quiet(cfg: TrainConfig) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, progress=False)
