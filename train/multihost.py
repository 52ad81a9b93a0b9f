"""Multi-process runs of both trainers: start-up, who writes, and what happens when a process dies.

The rules are the same for ``python -m train jax --distributed`` (one JAX process per host,
``jax.distributed``) and ``torchrun ... -m train torch`` (DDP):

- process 0 (torch: rank 0) alone checks or claims ``--out-dir`` and tells the others what it
  decided (start, resume or stop), through a collective, so a refused run stops every process;
- process 0 alone writes ``config.json``, ``metrics.jsonl``, the weight file and the evaluation
  files; JAX checkpoints are written by orbax collectively, torch checkpoints by rank 0;
- every wait on another process (start-up, each collective, the final barrier) is bounded by
  ``--peer-timeout`` seconds; a process that loses a peer stops with exit 1 and a message that
  names the newest checkpoint (which is kept) and says how to resume.
"""

from __future__ import annotations

import os

from . import rundir
from .rundir import RunError, note

_FRESH, _RESUME, _STOP = 0, 1, 2


def jax_initialize(timeout: int) -> None:
    """``jax.distributed.initialize()`` with every wait bounded by ``timeout`` seconds.

    Cloud TPU, SLURM and Open MPI are detected by JAX; elsewhere set JAX_COORDINATOR_ADDRESS
    (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID. On CPU, cross-process
    collectives use gloo unless JAX_CPU_COLLECTIVES_IMPLEMENTATION says otherwise.
    """
    import jax

    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kw = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
    where = os.environ.get("JAX_COORDINATOR_ADDRESS", "the address JAX detects")
    # JAX aborts the process (SIGABRT, "Terminating process because the JAX distributed service detected
    # fatal errors") when the coordinator cannot be reached in time: this line says what it waited for.
    note(f"jax.distributed.initialize: coordinator {where}; waiting up to --peer-timeout {timeout} s "
         f"for the other processes")
    jax.distributed.initialize(**kw, initialization_timeout=timeout, heartbeat_timeout_seconds=timeout,
                               shutdown_timeout_seconds=timeout)
    note(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local and "
         f"{jax.device_count()} global devices")


def agree_on_start(cfg, framework: str, *, is_writer: bool, broadcast) -> bool:
    """Process 0 checks or claims ``cfg.out_dir`` (``rundir.prepare``); every process gets its decision.

    Args:
        cfg: the ``TrainConfig`` of the run.
        framework: "jax" or "torch".
        is_writer: True on process 0.
        broadcast: ``int -> int``, process 0's value on every process (a collective); None in a
            single-process run.

    Returns:
        True to resume from the directory's checkpoints, False to start from step 0.

    Raises:
        RunError: process 0 refused the directory (its message; the others say so).
    """
    code, error = _FRESH, None
    if is_writer:
        try:
            code = _RESUME if rundir.prepare(cfg, framework) else _FRESH
        except RunError as e:
            code, error = _STOP, e
    if broadcast is not None:
        code = broadcast(code)
    if error is not None:
        raise error
    if code == _STOP:
        raise RunError(f"process 0 refused --out-dir {cfg.out_dir} (see its message); this process stops too")
    return code == _RESUME


class PeerLost(RunError):
    """A collective with the other processes failed: a peer died, hangs, or cannot be reached.

    ``python -m train`` prints the message and leaves with exit 1 at once (``os._exit``): a normal
    exit would first wait at JAX's shutdown barrier for the peer that is gone.
    """

    def __init__(self, error: BaseException, newest_checkpoint, timeout: int):
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        kept = (f"The newest checkpoint, {newest_checkpoint}, and the ones before it are kept"
                if newest_checkpoint is not None else "No checkpoint had been written")
        super().__init__(f"a collective with the other processes of this run failed or waited more than "
                         f"--peer-timeout {timeout} s, so another process stopped or cannot be reached "
                         f"({type(error).__name__}: {first}). {kept}; start every process again with --resume")
