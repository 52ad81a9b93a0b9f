"""The PyTorch twin of ``jax_train``: same task batches, model, schedule, clipping and AdamW.

Eager by default, ``--compile`` wraps the model in ``torch.compile``. ``--device`` picks
the device (``auto``: CUDA when available, else the CPU); ``--precision bfloat16`` runs
the forward pass under ``torch.autocast`` in bfloat16 with float32 parameters, gradients,
optimizer state and checkpoints. Under ``torchrun`` (``WORLD_SIZE`` set) it runs
DistributedDataParallel with gloo on CPU (nccl on CUDA): every rank draws the global batch
and trains on its own rows; DDP averages the gradients. Rank 0 alone writes the run's files
and checkpoints; every wait on another rank is bounded by ``--peer-timeout`` (see
``train/multihost.py``).

AdamW is ``torch.optim.AdamW`` (eps outside the square root, bias-corrected moments,
decoupled decay p <- p - lr * wd * p), the learning rate is set every step from
``config.lr_at`` (optax's warmup-cosine numbers), and clipping is written out to
match ``optax.clip_by_global_norm`` exactly (torch's ``clip_grad_norm_`` adds 1e-6).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed
import torch.nn.functional as F

from . import multihost, rundir, tasks
from .config import TrainConfig, decays, lr_at
from .report import MetricsLog, progress
from .rundir import RunError, note


def build_model(cfg: TrainConfig, *, device=None):
    """A ``DecoderLM`` with float64 parameters for ``float64``, else float32 (bf16 runs under autocast)."""
    from relattn_torch.decoder import DecoderConfig, DecoderLM

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
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits under autocast
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), reduction="none").view_as(weights)
    total = weights.sum()
    loss = (ce * weights).sum() / total
    acc = ((logits.argmax(-1) == targets) * weights).sum() / total
    return loss, acc.detach()


def select_device(spec: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RunError(f"device {spec!r} was asked for, but torch.cuda.is_available() is False here")
    device = torch.device(spec) if ":" in spec else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.index >= torch.cuda.device_count():
        raise RunError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class Trainer:
    """Model, optimizer, device and checkpoints of one run (one rank of a DDP run)."""

    def __init__(self, cfg: TrainConfig):
        import torch.distributed as dist

        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = select_device(cfg.device)
        if self.world > 1 and not dist.is_initialized():
            timeout = datetime.timedelta(seconds=cfg.peer_timeout)  # start-up and every collective
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=timeout)
        self.rank = dist.get_rank() if self.world > 1 else 0
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size must be divisible by WORLD_SIZE {self.world}, got {cfg.batch_size}")
        self.float_dtype = torch.float64 if cfg.precision == "float64" else torch.float32
        self.build()

    def build(self) -> None:
        """Fresh parameters (from ``cfg.seed``) and optimizer state."""
        self.model = build_model(self.cfg, device=self.device)
        self.optimizer = make_optimizer(self.cfg, self.model)
        net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
        self.net = torch.compile(net) if self.cfg.compile else net

    def autocast(self):
        """bf16 autocast on the run's device for ``--precision bfloat16``, else nothing."""
        if self.cfg.precision != "bfloat16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

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
        with self.autocast():
            loss, acc = loss_fn(self.net, *self.to_device(*data))
        loss.backward()
        clip_by_global_norm_(self.model.parameters(), cfg.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), acc

    def broadcast(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def global_mean(self, *values):
        """Average scalars over DDP ranks (each rank's loss covers its own rows)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        stacked = torch.stack([v.detach().to(self.float_dtype) for v in values])
        dist.all_reduce(stacked)
        return tuple(stacked / self.world)

    def all_finite(self, losses_finite: torch.Tensor, params: bool) -> bool:
        """True if every loss since the last check (and, with ``params``, every weight) is finite, on all ranks."""
        ok = losses_finite.clone()
        if params:
            for p in self.model.parameters():
                ok &= torch.isfinite(p).all()
        return float(self.global_mean(ok.to(self.float_dtype))[0]) == 1.0

    @torch.no_grad()
    def evaluate(self, length: int) -> dict:
        cfg, hits, count, exact = self.cfg, 0.0, 0.0, 0
        self.model.eval()
        for i in range(cfg.eval_batches):
            data = tasks.batch(cfg.task, seed=cfg.seed, step=i, batch_size=cfg.batch_size, length=length,
                               vocab_size=cfg.vocab_size, split="eval")
            tokens, targets, weights = self.to_device(*data, shard=False)
            with self.autocast():
                logits = self.model(tokens)
            correct = (logits.argmax(-1) == targets) * weights
            hits, count = hits + float(correct.sum()), count + float(weights.sum())
            exact += int((correct.sum(-1) == weights.sum(-1)).sum())
        return {"length": length, "T": tasks.seq_len(cfg.task, length), "token_acc": hits / count,
                "seq_acc": exact / (cfg.eval_batches * cfg.batch_size)}

    # -- checkpoints: the last keep_checkpoints of {weights, optimizer, config, step}, each written atomically --

    def ckpt_dir(self) -> Path:
        return Path(self.cfg.out_dir, "checkpoints")

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint file, oldest first."""
        found = [(int(p.stem[5:]), p) for p in self.ckpt_dir().glob("step_*.pt") if p.stem[5:].isdigit()]
        return sorted(found)

    def save(self, step: int) -> None:
        if self.rank:
            return
        path = self.ckpt_dir() / f"step_{step:08d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                 "config": self.cfg.to_json()}
        tmp = path.with_name("." + path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash leaves the previous checkpoints intact
        for _, old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
            old.unlink()

    def restore(self) -> tuple[int | None, list[str]]:
        """Load the newest valid checkpoint, deleting the invalid ones after it.

        Returns:
            (its step, or None if none is valid; one line per invalid checkpoint).

        Raises:
            RunError: a readable checkpoint whose config differs from this run's (see ``rundir``).
        """
        reasons = []
        for step, path in reversed(self.checkpoints()):
            try:
                state = torch.load(path, map_location=self.device, weights_only=True)
                self.load_state(state, step)
                return step, reasons
            except RunError:
                raise
            except Exception as e:  # a torn or foreign file: torch.load and the checks raise many types
                reasons.append(f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                note(f"checkpoint {path} is not valid ({reasons[-1]}); falling back to the one before it")
                if self.rank == 0:
                    path.unlink()
        return None, reasons

    def load_state(self, state: dict, step: int) -> None:
        """Check a loaded checkpoint (keys, step, config, names, shapes, finite values) and load it."""
        if not isinstance(state, dict) or set(state) != {"model", "optimizer", "step", "config"}:
            raise ValueError("not a checkpoint of this trainer")
        if int(state["step"]) != step:
            raise ValueError(f"holds step {state['step']}, its name says {step}")
        rundir.check_resume(state["config"], self.cfg)
        own = self.model.state_dict()
        saved = state["model"]
        if sorted(saved) != sorted(own) or any(saved[k].shape != own[k].shape for k in own):
            raise ValueError("parameter names or shapes differ from the model's")
        opt = [t for s in state["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t)]
        if not all(bool(torch.isfinite(t).all()) for t in [*saved.values(), *opt]):
            raise ValueError("holds non-finite values")
        self.model.load_state_dict(saved)
        self.optimizer.load_state_dict(state["optimizer"])


def resume(trainer: Trainer) -> int:
    """The step to start from: the newest valid checkpoint's, or 0 (``--allow-fresh``)."""
    step, reasons = trainer.restore()
    if step is not None:
        if trainer.rank == 0:
            rundir.write_config(trainer.cfg, "torch")  # the new --steps and logging fields
        return step
    rundir.nothing_to_resume(trainer.cfg, "torch", reasons, is_writer=trainer.rank == 0)
    trainer.build()  # a checkpoint that failed its checks may have been loaded in part
    return 0


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; write the weights; evaluate at L * eval_scales; write metrics, plot.

    Raises:
        RunError: the output directory holds another run or nothing to resume, the flags
            differ from the resumed run's, or the loss became non-finite (the checkpoints
            written before that are kept).
        multihost.PeerLost: (under torchrun) a collective failed: another rank died, hangs past
            ``--peer-timeout`` or cannot be reached; the checkpoints are kept.
    """
    select_device(cfg.device)  # an unavailable device fails before out_dir is touched
    trainer = Trainer(cfg)
    try:
        # Rank 0 claims or checks the directory; the others follow its decision (or stop with it).
        is_resume = multihost.agree_on_start(cfg, "torch", is_writer=trainer.rank == 0,
                                             broadcast=trainer.broadcast if trainer.world > 1 else None)
        start = resume(trainer) if is_resume else 0
        last = _loop(trainer, start)
        return finish(trainer, last, Path(cfg.out_dir))
    except RuntimeError as e:  # gloo / nccl: a peer died (connection closed) or timed out
        if trainer.world == 1 or not _lost_peer(e):
            raise
        kept = trainer.checkpoints()
        raise multihost.PeerLost(e, kept[-1][1] if kept else None, cfg.peer_timeout) from e


def _lost_peer(error: RuntimeError) -> bool:
    """A failed collective: DDP's backward raises gloo's and nccl's errors as plain RuntimeErrors."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        word in text for word in ("gloo", "NCCL", "Connection", "timed out", "Timed out"))


def _loop(trainer: Trainer, start: int) -> dict:
    """Steps ``start`` to ``cfg.steps``: log, check finiteness, checkpoint; the last logged metrics."""
    cfg, out = trainer.cfg, Path(trainer.cfg.out_dir)
    log = MetricsLog(out / "metrics.jsonl", keep_until=start) if trainer.rank == 0 else None
    tokens_per_step = cfg.batch_size * tasks.seq_len(cfg.task, cfg.length)
    bar = progress(cfg if trainer.rank == 0 else _quiet(cfg), start, "torch")
    last, t0, since, checked = {}, time.perf_counter(), start, start
    finite = torch.ones((), dtype=torch.bool, device=trainer.device)
    for step in range(start, cfg.steps):
        loss, acc = trainer.step(step)
        finite &= torch.isfinite(loss)
        done = step + 1
        save = done % cfg.ckpt_every == 0 or done == cfg.steps
        if done % cfg.log_every == 0 or save:
            if not trainer.all_finite(finite, params=save):
                raise RunError(_nonfinite_message(trainer, checked, done))
            checked = done
        if done % cfg.log_every == 0 or done == cfg.steps:
            loss, acc = trainer.global_mean(loss, acc)
            dt = time.perf_counter() - t0
            last = {"step": done, "loss": float(loss), "acc": float(acc),
                    "tokens_per_s": tokens_per_step * (done - since) / dt}
            if log is not None:
                log.write(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['acc']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            t0, since = time.perf_counter(), done
        bar.update(1)
        if save:
            trainer.save(done)
        if done == cfg.crash_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return last


def _nonfinite_message(trainer: Trainer, checked: int, done: int) -> str:
    kept = trainer.checkpoints()
    where = (f"{kept[-1][1]} (step {kept[-1][0]}); it and the ones before it "
             f"are kept" if kept else "no checkpoint had been written")
    steps = f"step {done}" if done == checked + 1 else f"steps {checked + 1}-{done}"
    return (f"the training loss or the weights became non-finite ({steps}); stopped without writing weights. "
            f"The last good checkpoint: {where}")


def finish(trainer: Trainer, last: dict, out: Path) -> dict:
    """Write the weight file, then evaluate and write the evaluation files."""
    from relattn_torch.weights import save_weights

    from .report import write_eval

    cfg = trainer.cfg
    if trainer.rank == 0:
        save_weights(trainer.model, out / "weights.safetensors")  # before evaluating: nothing can lose them
    rows = [trainer.evaluate(cfg.length * s) for s in cfg.eval_scales]
    summary = {"final": last, "eval": rows, "out_dir": str(out), "world_size": trainer.world}
    if trainer.rank == 0:
        write_eval(out, cfg, rows, framework="torch")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _quiet(cfg: TrainConfig) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, progress=False)
