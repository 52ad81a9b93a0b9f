"""Train the toy decoder with Flax NNX + optax under ``nnx.jit``, data-parallel over devices.

The batch axis is sharded over every device ``jax.devices()`` returns (a 1-D Mesh
named ``data``; parameters and optimizer state are replicated), so the same code
runs on one CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4``, a GPU or a
TPU slice. Multi-host: call ``jax.distributed.initialize()`` first (``--distributed``
in ``python -m train jax``, see ``train/multihost.py``); each host then generates the global
batch and keeps its own rows (the batch is a pure function of seed and step). Process 0
alone writes the run's files; orbax writes the checkpoints collectively.

Checkpoints (orbax) hold {model, optimizer} and {step, config}; the last
``--keep-checkpoints`` are kept, and ``--resume`` restores the newest one that passes its
checks. Data depend only on (seed, step), so ``--resume`` continues bit-for-bit.
Nothing here assumes a platform: ``--device auto`` (the default) takes every device of
the default backend; ``cpu`` and ``cuda[:i]`` pick from ``jax.devices("cpu")`` /
``jax.devices("gpu")``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import multihost, rundir, tasks
from .config import TrainConfig, decays
from .report import MetricsLog, progress
from .rundir import RunError, note

_DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}


def build_model(cfg: TrainConfig, *, seed: int | None = None):
    """A ``DecoderLM`` with float64 parameters for ``float64``, else float32 (bf16 compute for ``bfloat16``)."""
    from relattn_jax.decoder import DecoderConfig, DecoderLM

    if cfg.precision == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    param_dtype = jnp.float64 if cfg.precision == "float64" else jnp.float32
    dtype = jnp.bfloat16 if cfg.precision == "bfloat16" else None
    seed = cfg.seed if seed is None else seed
    return DecoderLM(DecoderConfig(**cfg.decoder_kwargs()), dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def _decay_mask(params):
    def leaf(path, _):
        names = [k.key if hasattr(k, "key") else getattr(k, "name", None) for k in path]
        names = [n for n in names if isinstance(n, str) and n not in ("value", "raw_value")]
        return decays(names[-1])

    return jax.tree_util.tree_map_with_path(leaf, params)


def make_tx(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the warmup-cosine schedule."""
    warmup_cosine = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.end_lr_ratio
    )

    def schedule(count):
        # optax evaluates the schedule in float32 for an int32 count; a float count keeps
        # float64 runs in float64 (the PyTorch twin's learning rate is a Python float).
        return warmup_cosine(jnp.asarray(count, jnp.result_type(float)))

    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask),
    )


def loss_fn(model, tokens, targets, weights):
    """Masked mean cross-entropy and accuracy over the positions with weight 1."""
    logits = model(tokens)  # [B, T, V]
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    total = weights.sum()
    loss = (ce * weights).sum() / total
    acc = ((logits.argmax(-1) == targets) * weights).sum() / total
    return loss, acc


@nnx.jit
def train_step(model, optimizer, tokens, targets, weights):
    (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens, targets, weights)
    optimizer.update(model, grads)
    return loss, acc


@jax.jit
def all_finite(tree) -> jax.Array:
    """True if every float leaf of ``tree`` is finite."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves))


def select_devices(spec: str) -> list:
    """``auto``: ``jax.devices()``; ``cpu``: the CPU devices; ``cuda``: the GPUs; ``cuda:i``: GPU i."""
    if spec == "auto":
        return jax.devices()
    platform = "cpu" if spec == "cpu" else "gpu"
    try:
        devices = jax.devices(platform)
    except RuntimeError as e:
        raise RunError(f"device {spec!r}: jax has no {platform} backend here ({e})") from e
    if platform != jax.default_backend():
        # relattn_jax's "auto" dispatch reads jax.default_backend() for traced arrays (relattn_jax/choice.py),
        # so under nnx.jit it would pick the default backend's attention path for these devices.
        raise RunError(f"device {spec!r}: jax's default backend is {jax.default_backend()!r}; set "
                       f"JAX_PLATFORMS={platform} to train on {platform} (the attention dispatch follows "
                       f"the default backend under jit)")
    if ":" in spec:
        i = int(spec.split(":")[1])
        if i >= len(devices):
            raise RunError(f"device {spec!r}: jax sees {len(devices)} GPU(s)")
        devices = devices[i : i + 1]
    return devices


@nnx.jit
def eval_step(model, tokens, targets, weights):
    logits = model(tokens)
    correct = (logits.argmax(-1) == targets) * weights
    return correct.sum(), weights.sum(), (correct.sum(-1) == weights.sum(-1)).sum()


class Trainer:
    """Model, optimizer, mesh and checkpoints of one run."""

    def __init__(self, cfg: TrainConfig, devices=None):
        self.cfg = cfg
        self.model = build_model(cfg)
        self.optimizer = nnx.Optimizer(self.model, make_tx(cfg), wrt=nnx.Param)
        self.devices = list(select_devices(cfg.device) if devices is None else devices)
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.replicate()
        self.float_dtype = np.float64 if cfg.precision == "float64" else np.float32

    def replicate(self) -> None:
        """Place parameters and optimizer state on every device (replicated)."""
        state = nnx.state((self.model, self.optimizer))
        nnx.update((self.model, self.optimizer), jax.device_put(state, NamedSharding(self.mesh, P())))

    def put_batch(self, tokens, targets, weights):
        """Shard a host batch on its batch axis (every process holds the global batch)."""
        n = len(self.devices)
        if tokens.shape[0] % n:
            raise ValueError(f"batch_size must be divisible by the device count {n}, got {tokens.shape[0]}")
        arrays = (tokens, targets, weights.astype(self.float_dtype))
        if jax.process_count() == 1:
            return tuple(jax.device_put(a, self.batch_sharding) for a in arrays)
        return tuple(
            jax.make_array_from_callback(a.shape, self.batch_sharding, lambda idx, a=a: a[idx]) for a in arrays
        )

    def step(self, step: int):
        cfg = self.cfg
        data = tasks.batch(cfg.task, seed=cfg.seed, step=step, batch_size=cfg.batch_size, length=cfg.length,
                           vocab_size=cfg.vocab_size)
        return train_step(self.model, self.optimizer, *self.put_batch(*data))

    def evaluate(self, length: int) -> dict:
        cfg, hits, count, exact = self.cfg, 0.0, 0.0, 0
        for i in range(cfg.eval_batches):
            data = tasks.batch(cfg.task, seed=cfg.seed, step=i, batch_size=cfg.batch_size, length=length,
                               vocab_size=cfg.vocab_size, split="eval")
            h, c, e = eval_step(self.model, *self.put_batch(*data))
            hits, count, exact = hits + float(h), count + float(c), exact + int(e)
        return {"length": length, "T": tasks.seq_len(cfg.task, length), "token_acc": hits / count,
                "seq_acc": exact / (cfg.eval_batches * cfg.batch_size)}

    # -- checkpoints ---------------------------------------------------------

    def checkpointer(self):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep_checkpoints,
                                               save_interval_steps=self.cfg.ckpt_every,
                                               enable_async_checkpointing=False)
        return ocp.CheckpointManager(Path(self.cfg.out_dir, "checkpoints").absolute(), options=options)

    def save(self, manager, step: int, force: bool = False) -> None:
        import orbax.checkpoint as ocp

        state = nnx.to_pure_dict(nnx.state((self.model, self.optimizer)))
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave({"step": step, "config": self.cfg.to_json()})),
                     force=force)

    def restore(self, manager) -> tuple[int | None, list[str]]:
        """Load the newest valid checkpoint, deleting the invalid ones after it.

        Returns:
            (its step, or None if none is valid; one line per invalid checkpoint).

        Raises:
            RunError: a readable checkpoint whose config differs from this run's (see ``rundir``).
        """
        reasons = []
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                self.load_step(manager, step)
                return step, reasons
            except RunError:
                raise
            except Exception as e:  # a torn or foreign step: orbax and the checks raise many types
                if isinstance(e, jax.errors.JaxRuntimeError) and jax.process_count() > 1:
                    raise  # a lost peer, not a torn checkpoint: delete nothing
                reasons.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                note(f"checkpoint {manager.directory}/{step} is not valid ({reasons[-1]}); "
                     f"falling back to the one before it")
                manager.delete(step)  # collective (a barrier); orbax deletes on process 0 only
        return None, reasons

    def load_step(self, manager, step: int) -> None:
        """Restore one step, check it (step, config, finite values), then load it into model and optimizer."""
        import orbax.checkpoint as ocp

        state = nnx.state((self.model, self.optimizer))
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        if int(meta["step"]) != step:
            raise ValueError(f"holds step {meta['step']}, its directory says {step}")
        rundir.check_resume(meta["config"], self.cfg)
        if not bool(all_finite(restored["state"])):
            raise ValueError("holds non-finite values")
        nnx.replace_by_pure_dict(state, restored["state"])
        nnx.update((self.model, self.optimizer), state)
        self.replicate()


def resume(trainer: Trainer, manager) -> int:
    """The step to start from: the newest valid checkpoint's, or 0 (``--allow-fresh``)."""
    step, reasons = trainer.restore(manager)
    if step is not None:
        if jax.process_index() == 0:
            rundir.write_config(trainer.cfg, "jax")  # the new --steps and logging fields
        return step
    rundir.nothing_to_resume(trainer.cfg, "jax", reasons, is_writer=jax.process_index() == 0)
    return 0


def train(cfg: TrainConfig, devices=None) -> dict:
    """Run (or resume) training, write the weights, evaluate at L * eval_scales, write metrics and plot.

    Args:
        cfg: the run.
        devices: the devices of the data-parallel mesh; default ``select_devices(cfg.device)``.

    Returns:
        {"final": last logged train metrics, "eval": [per-length eval rows], "out_dir": ...}.

    Raises:
        RunError: the output directory holds another run or nothing to resume, the flags
            differ from the resumed run's, or the loss became non-finite (the checkpoints
            written before that are kept).
        multihost.PeerLost: (several processes) a collective failed: another process died,
            hangs past ``--peer-timeout`` or cannot be reached; the checkpoints are kept.
    """
    out = Path(cfg.out_dir)
    devices = select_devices(cfg.device) if devices is None else devices  # fails before out_dir is touched
    writer, manager = jax.process_index() == 0, None
    try:
        # Process 0 claims or checks the directory; the others follow its decision (or stop with it).
        is_resume = multihost.agree_on_start(cfg, "jax", is_writer=writer,
                                              broadcast=_broadcast if jax.process_count() > 1 else None)
        trainer = Trainer(cfg, devices)
        manager = trainer.checkpointer()
        start = resume(trainer, manager) if is_resume else 0
        last = _loop(trainer, manager, start, writer)
        manager.wait_until_finished()
        return finish(trainer, last, out)
    except jax.errors.JaxRuntimeError as e:  # gloo / NCCL / ICI: a peer died (connection closed) or timed out
        if jax.process_count() == 1:
            raise
        newest = manager.latest_step() if manager is not None else None
        where = None if newest is None else f"{manager.directory}/{newest}"
        raise multihost.PeerLost(e, where, cfg.peer_timeout) from e


def _loop(trainer: Trainer, manager, start: int, writer: bool) -> dict:
    """Steps ``start`` to ``cfg.steps``: log, check finiteness, checkpoint; the last logged metrics."""
    cfg, out = trainer.cfg, Path(trainer.cfg.out_dir)
    log = MetricsLog(out / "metrics.jsonl", keep_until=start) if writer else None
    tokens_per_step = cfg.batch_size * tasks.seq_len(cfg.task, cfg.length)
    bar = progress(cfg if writer else dataclasses.replace(cfg, progress=False), start, "jax")
    last, t0, since, checked, finite = {}, time.perf_counter(), start, start, jnp.asarray(True)
    for step in range(start, cfg.steps):
        loss, acc = trainer.step(step)
        finite = finite & jnp.isfinite(loss)  # on the device: no host sync per step
        done = step + 1
        save = done % cfg.ckpt_every == 0 or done == cfg.steps
        if done % cfg.log_every == 0 or save:
            if not bool(finite & (all_finite(nnx.state(trainer.model, nnx.Param)) if save else True)):
                raise RunError(_nonfinite_message(manager, checked, done))
            checked = done
        if done % cfg.log_every == 0 or done == cfg.steps:
            loss, acc = float(loss), float(acc)  # the host syncs at log steps only
            dt = time.perf_counter() - t0
            last = {"step": done, "loss": loss, "acc": acc, "tokens_per_s": tokens_per_step * (done - since) / dt}
            if log is not None:
                log.write(last)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            t0, since = time.perf_counter(), done
        bar.update(1)
        if save:
            trainer.save(manager, done, force=done == cfg.steps)
        if done == cfg.crash_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return last


def _broadcast(value: int) -> int:
    """Process 0's ``value`` on every process (a collective of a multi-process run)."""
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _nonfinite_message(manager, checked: int, done: int) -> str:
    latest = manager.latest_step()
    where = (f"{manager.directory}/{latest} (step {latest}); it and the ones "
             f"before it are kept" if latest is not None else "no checkpoint had been written")
    steps = f"step {done}" if done == checked + 1 else f"steps {checked + 1}-{done}"
    return (f"the training loss or the weights became non-finite ({steps}); stopped without writing weights. "
            f"The last good checkpoint: {where}")


def finish(trainer: Trainer, last: dict, out: Path) -> dict:
    """Write the weight file, then evaluate and write the evaluation files."""
    from relattn_jax.weights import save_weights

    from .report import write_eval

    cfg = trainer.cfg
    if jax.process_index() == 0:
        save_weights(trainer.model, out / "weights.safetensors")  # before evaluating: nothing can lose them
    rows = [trainer.evaluate(cfg.length * s) for s in cfg.eval_scales]
    summary = {"final": last, "eval": rows, "out_dir": str(out), "devices": len(trainer.devices)}
    if jax.process_index() == 0:
        write_eval(out, cfg, rows, framework="jax")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
