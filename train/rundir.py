"""The output directory of one run: never mix two runs, never resume the wrong one.

Framework-free; both trainers call ``prepare`` before any training and ``check_resume``
with the config stored in the checkpoint they restore. A run directory holds
``config.json`` (the run's ``TrainConfig``), ``metrics.jsonl``, ``checkpoints/`` and,
once training ends, the weights and the evaluation files.

Rules:

- a fresh run needs a missing or empty directory; ``--overwrite`` deletes what is there;
- ``--resume`` needs a run to resume; on a missing or empty directory it stops, unless
  ``--allow-fresh`` (then it starts from step 0);
- on resume the saved config must equal the new one except for ``RESUMABLE`` fields;
  ``steps`` may only grow.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

CONFIG = "config.json"
METRICS = "metrics.jsonl"
# Fields that may differ between a run and its resumption: they change how the run is
# logged, checkpointed or executed, not what it computes. ``steps`` may grow (checked apart).
RESUMABLE = frozenset({"log_every", "ckpt_every", "keep_checkpoints", "progress", "resume", "overwrite",
                       "allow_fresh", "crash_at_step", "out_dir", "device", "compile", "peer_timeout"})


class RunError(RuntimeError):
    """A run that must not start or go on; ``python -m train`` prints the message and exits 1."""


def note(message: str) -> None:
    """A one-line notice on stderr (fallbacks, dropped lines, fresh starts)."""
    print(f"[train] {message}", file=sys.stderr, flush=True)


def prepare(cfg, framework: str, *, is_writer: bool = True) -> bool:
    """Check (and for a fresh run, clear and claim) ``cfg.out_dir``.

    Args:
        cfg: the ``TrainConfig`` of the run.
        framework: "jax" or "torch", the trainer; a run is resumed only by its own trainer.
        is_writer: False for the checks alone (``python -m train`` runs them before a
            framework loads). In a multi-process run only process 0 calls this.

    Returns:
        True to resume from the directory's checkpoints, False to start from step 0.

    Raises:
        RunError: the directory holds another run, or holds nothing to resume.
    """
    out = Path(cfg.out_dir)
    holds = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise RunError(f"out_dir {out} exists and is not a directory")
    if cfg.resume and holds:
        saved = out / CONFIG
        if saved.exists():
            check_resume(read_config(saved), cfg, framework)
        return True  # the trainer writes config.json once a checkpoint is restored
    if cfg.resume and not cfg.allow_fresh:
        raise RunError(f"--resume: there is no run in {out} (missing or empty directory); "
                       f"pass --allow-fresh to start a new run there from step 0")
    if holds and cfg.overwrite and not looks_like_a_run(out):
        raise RunError(f"--overwrite: {out} holds no {CONFIG}, {METRICS} or checkpoints/, so it is not a run "
                       f"directory; it is left alone. Delete it yourself or choose another --out-dir")
    if holds and not cfg.overwrite:
        shown = ", ".join(holds[:5]) + (", ..." if len(holds) > 5 else "")
        raise RunError(f"out_dir {out} is not empty ({shown}): a fresh run never shares a directory with "
                       f"another run. Pass --resume to continue the run there, --overwrite to delete it, "
                       f"or choose another --out-dir")
    if is_writer:
        if cfg.resume:
            note(f"--resume --allow-fresh: nothing to resume in {out}, starting from step 0")
        start_fresh(cfg, framework)
    return False


def looks_like_a_run(out: Path) -> bool:
    """True if ``out`` holds a trainer's files (--overwrite deletes nothing else: not a home or a repository)."""
    return any((out / name).exists() for name in (CONFIG, METRICS, "checkpoints"))


def start_fresh(cfg, framework: str) -> None:
    """Delete the directory's contents (if any) and write the run's config.json."""
    out = Path(cfg.out_dir)
    if out.is_dir() and any(out.iterdir()):
        note(f"deleting the previous contents of {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, framework)


def write_config(cfg, framework: str) -> None:
    """``config.json``: the run's ``TrainConfig`` fields and ``"framework"`` (written atomically)."""
    path = Path(cfg.out_dir, CONFIG)
    tmp = path.with_name(CONFIG + ".tmp")
    tmp.write_text(json.dumps({**json.loads(cfg.to_json()), "framework": framework}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def read_config(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read the run's config {path}: {e}") from e


def changed_fields(saved: dict, cfg) -> list[str]:
    """``"name: saved -> new"`` for every field that may not change on resume."""
    new = json.loads(cfg.to_json())
    changed = []
    for name in sorted(set(saved) & set(new)):
        old, now = saved[name], new[name]
        if name == "steps" and isinstance(old, int) and now >= old:
            continue
        if name not in RESUMABLE and old != now:
            changed.append(f"{name}: {old!r} -> {now!r}" + (" (steps may only grow)" if name == "steps" else ""))
    return changed


def check_resume(saved, cfg, framework: str | None = None) -> None:
    """Raise RunError listing the changed fields if ``cfg`` may not resume a run saved with ``saved``.

    Args:
        saved: the saved config, as a dict or as the JSON string in a checkpoint.
        cfg: the new ``TrainConfig``.
        framework: the trainer that resumes; compared with the saved one when both are known.
    """
    if isinstance(saved, str):
        saved = json.loads(saved)
    if framework and saved.get("framework", framework) != framework:
        raise RunError(f"--resume: {cfg.out_dir} holds a run of the {saved['framework']} trainer; continue it "
                       f"with python -m train {saved['framework']} --resume, or start this one elsewhere")
    changed = changed_fields(saved, cfg)
    if changed:
        shown = sorted(RESUMABLE - {"resume", "crash_at_step", "overwrite", "allow_fresh"})
        allowed = ", ".join("--" + n.replace("_", "-") for n in shown)
        raise RunError(f"--resume in {cfg.out_dir} with flags that differ from the saved run: "
                       + "; ".join(changed)
                       + f". Only --steps (upward) and {allowed} may change; start a new run in another "
                       f"--out-dir to train with other values")


def nothing_to_resume(cfg, framework: str, reasons: list[str], *, is_writer: bool = True) -> None:
    """The directory holds no valid checkpoint: stop, or with ``--allow-fresh`` start from step 0.

    Args:
        cfg: the ``TrainConfig`` of the run.
        framework: "jax" or "torch", the trainer.
        reasons: one line per checkpoint that failed validation (empty if there were none).
        is_writer: False on the processes that must not write.
    """
    out = Path(cfg.out_dir)
    found = "; ".join(reasons) if reasons else "no checkpoint was written"
    if not cfg.allow_fresh:
        raise RunError(f"--resume: nothing valid to resume in {out} ({found}); "
                       f"pass --allow-fresh to start this run again from step 0")
    if not (out / CONFIG).exists():
        raise RunError(f"--resume --allow-fresh: {out} holds files but no {CONFIG}, so they may belong to "
                       f"another run; delete them or choose another --out-dir")
    note(f"--resume --allow-fresh: nothing valid to resume in {out} ({found}); starting from step 0")
    if is_writer:
        start_fresh(cfg, framework)
