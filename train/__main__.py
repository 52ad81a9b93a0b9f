"""``python -m train {demo,jax,torch} [--flag value ...]``.

    demo   train the relative model and the absolute baseline (JAX), evaluate both at
           L, 2L, 4L, print/save the table and plot, show a few greedy generations
           (replaces the previous demo's runs unless --resume)
    jax    one run of the Flax NNX trainer (``--distributed`` calls jax.distributed.initialize())
    torch  one run of the PyTorch twin (eager; ``--compile``; under torchrun: DDP;
           ``--device auto|cpu|cuda[:i]``, ``--precision bfloat16`` for autocast)

A fresh run needs an empty --out-dir (--overwrite deletes what is there); --resume continues
the run there (--allow-fresh: start from step 0 when there is nothing to resume). Errors that
stop a run exit 1, invalid flag values exit 2.
"""

from __future__ import annotations

import os
import sys

USAGE = __doc__


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("demo", "jax", "torch"):
        print(USAGE)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    from .multihost import PeerLost
    from .rundir import RunError

    try:
        run_command(command, rest)
    except RunError as e:
        print(f"python -m train {command}: error: {e}", file=sys.stderr, flush=True)
        if isinstance(e, PeerLost):
            sys.stdout.flush()
            os._exit(1)  # not through JAX's shutdown barrier, which would wait for the lost peer
        raise SystemExit(1) from None


def run_command(command: str, rest: list[str]) -> None:
    """Parse the flags (bad values exit 2 naming the field, before any framework loads) and run."""
    from .config import parse_args

    distributed = command == "jax" and "--distributed" in rest
    rest = [a for a in rest if not (distributed and a == "--distributed")]
    cfg = parse_args(rest, prog=f"python -m train {command}", defaults={"out_dir": f"runs/{command}"})
    if command != "demo" and not distributed and os.environ.get("WORLD_SIZE", "1") == "1":
        from .rundir import prepare

        prepare(cfg, command, is_writer=False)  # the directory checks, before a framework loads (read-only)
    if command == "demo":
        from .demo import run_demo

        run_demo(cfg)
    elif command == "jax":
        if distributed:
            from .multihost import jax_initialize

            jax_initialize(cfg.peer_timeout)  # before any JAX computation
        from .jax_train import train

        train(cfg)
    else:
        from .torch_train import train

        train(cfg)


if __name__ == "__main__":
    main()
