"""Fault tests of both trainers, run as ``python -m train {jax,torch}`` subprocesses: a truncated
newest checkpoint, a torn metrics line, a foreign run in the output directory, changed flags on
resume, ``--resume`` on an empty directory, invalid flag values and a loss that becomes non-finite.
Also the torch twin's ``--device cpu`` and ``--precision bfloat16`` (autocast) paths, in process."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ["jax", "torch"]
TINY_FLAGS = ["--length", "4", "--vocab-size", "12", "--embed-dim", "16", "--num-heads", "2", "--num-layers", "1",
              "--mlp-dim", "32", "--max-distance", "2", "--batch-size", "4", "--warmup-steps", "5", "--lr", "1e-2",
              "--eval-scales", "1", "--eval-batches", "1", "--log-every", "1", "--ckpt-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """One persistent XLA compilation cache for every JAX subprocess of this file."""
    return tmp_path_factory.mktemp("xla_cache")


def _train(framework: str, out, *flags, cache=None) -> subprocess.CompletedProcess:
    """``python -m train <framework> <tiny flags> --out-dir out <flags>``: one fresh process."""
    pytest.importorskip(framework)  # a one-framework venv skips the other trainer
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    if cache is not None:  # the runs compile the same programs once between them
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    argv = [sys.executable, "-m", "train", framework, *TINY_FLAGS, "--out-dir", str(out), *map(str, flags)]
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _refused(proc: subprocess.CompletedProcess, *phrases: str, code: int = 1) -> str:
    """The run stopped with exit ``code``, a one-line error (no traceback) holding every phrase."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in proc.stderr, (phrase, proc.stderr[-3000:])
    return proc.stderr


def _strict_float(name):
    raise ValueError(f"non-finite {name} in metrics.jsonl")


def _metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=_strict_float) for line in lines]


def _checkpoint_steps(framework: str, out: Path) -> list[int]:
    ckpt = out / "checkpoints"
    if framework == "jax":
        return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    return sorted(int(p.stem[5:]) for p in ckpt.glob("step_*.pt"))


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=FRAMEWORKS)
def base_run(request, tmp_path_factory, xla_cache):
    """A finished 4-step run with a checkpoint every step: (framework, its directory)."""
    framework = request.param
    out = tmp_path_factory.mktemp(f"base_{framework}") / "run"
    _ok(_train(framework, out, "--steps", 4, cache=xla_cache))
    return framework, out


def _copy(base_run, tmp_path) -> tuple[str, Path]:
    framework, out = base_run
    shutil.copytree(out, tmp_path / "run")
    return framework, tmp_path / "run"


def test_keeps_the_last_checkpoints(base_run):
    framework, out = base_run
    assert _checkpoint_steps(framework, out) == [2, 3, 4]  # --keep-checkpoints 3 (the default)
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["steps"] == 4
    assert (out / "weights.safetensors").exists()


def _truncate_newest(framework: str, out: Path) -> None:
    """Cut every file of the newest checkpoint to a third, as a kill or a full disk would.

    Every file, not one: an orbax (OCDBT) checkpoint may hold data files that no array reads, and
    a checkpoint whose damage lies only there restores correctly."""
    newest = max(_checkpoint_steps(framework, out))
    where = out / "checkpoints" / (str(newest) if framework == "jax" else f"step_{newest:08d}.pt")
    for victim in [where] if where.is_file() else [p for p in where.rglob("*") if p.is_file()]:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])


def test_truncated_checkpoint_and_torn_metrics_line_fall_back(base_run, tmp_path, xla_cache):
    framework, out = _copy(base_run, tmp_path)
    _truncate_newest(framework, out)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 2.4')  # a kill in the middle of a write
    log = _ok(_train(framework, out, "--resume", "--steps", 6, cache=xla_cache))
    assert "is not valid" in log and "falling back" in log, log[-3000:]
    assert "torn last line" in log, log[-3000:]
    rows, before = _metrics(out), _metrics(base_run[1])
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # Restored at step 3: step 4 is recomputed from it. Warmup covers steps 0-4, so the
    # learning rates do not depend on --steps and the loss of step 4 is bit-for-bit the same.
    assert [r["loss"] for r in rows[:4]] == [r["loss"] for r in before]
    assert _checkpoint_steps(framework, out) == [4, 5, 6]


def test_every_checkpoint_invalid_stops_unless_allow_fresh(base_run, tmp_path, xla_cache):
    framework, out = _copy(base_run, tmp_path)
    for p in (out / "checkpoints").rglob("*"):
        if p.is_file() and p.stat().st_size > 64:
            p.write_bytes(p.read_bytes()[:32])
    _refused(_train(framework, out, "--resume", cache=xla_cache), "nothing valid to resume", "--allow-fresh")
    log = _ok(_train(framework, out, "--resume", "--allow-fresh", "--steps", 5, cache=xla_cache))
    assert "starting from step 0" in log
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in _metrics(out)][:4] == [r["loss"] for r in _metrics(base_run[1])]  # from scratch


def test_fresh_run_refuses_a_foreign_run(base_run, tmp_path, xla_cache):
    framework, out = _copy(base_run, tmp_path)
    before = _snapshot(out)
    _refused(_train(framework, out, "--steps", 2, "--seed", 1, cache=xla_cache), "is not empty", "--overwrite")
    assert _snapshot(out) == before  # nothing touched
    (out / "old-notes.txt").write_text("from the older run")
    log = _ok(_train(framework, out, "--steps", 2, "--seed", 1, "--overwrite", cache=xla_cache))
    assert "deleting the previous contents" in log
    assert not (out / "old-notes.txt").exists()
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    assert _checkpoint_steps(framework, out) == [1, 2]
    assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_resume_with_changed_flags_is_refused(base_run, tmp_path, xla_cache):
    framework, out = _copy(base_run, tmp_path)
    before = _snapshot(out)
    log = _refused(_train(framework, out, "--resume", "--lr", 0.1, "--embed-dim", 32, "--steps", 2,
                          "--log-every", 2, cache=xla_cache),
                   "embed_dim: 16 -> 32", "lr: 0.01 -> 0.1", "steps: 4 -> 2 (steps may only grow)")
    assert "log_every" not in log.split("differ from the saved run")[1].split(". Only")[0]
    assert _snapshot(out) == before


def test_the_other_trainer_does_not_resume_a_run(base_run, tmp_path):
    framework, out = _copy(base_run, tmp_path)
    other = "torch" if framework == "jax" else "jax"
    before = _snapshot(out)
    _refused(_train(other, out, "--resume", "--allow-fresh"), f"holds a run of the {framework} trainer")
    assert _snapshot(out) == before


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_overwrite_deletes_only_a_run_directory(framework, tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    _refused(_train(framework, tmp_path, "--overwrite"), "is not a run directory", "left alone")
    assert (tmp_path / "notes.txt").read_text() == "not a run"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_on_an_empty_or_missing_directory(framework, tmp_path):
    _refused(_train(framework, tmp_path / "missing", "--resume"), "there is no run", "--allow-fresh")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    _refused(_train(framework, tmp_path / "empty", "--resume"), "there is no run")
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(framework, tmp_path, xla_cache):
    out = tmp_path / "run"
    # lr 1e30 from step 0: the first update throws the weights to ~1e30, the next loss is not finite
    log = _refused(_train(framework, out, "--lr", 1e30, "--warmup-steps", 0, "--steps", 6, cache=xla_cache),
                   "became non-finite (step 2)", "stopped without writing weights")
    assert "checkpoints" in log.split("The last good checkpoint:")[1]
    assert _checkpoint_steps(framework, out) == [1]
    assert not (out / "weights.safetensors").exists()
    assert [r["step"] for r in _metrics(out)] == [1]  # finite rows only (parsed strictly)


INVALID = [
    (["--lr", "nan"], "lr"),
    (["--lr", "inf"], "lr"),
    (["--lr", "-0.1"], "lr"),
    (["--b1", "1.0"], "b1"),
    (["--b2", "-0.5"], "b2"),
    (["--weight-decay", "nan"], "weight_decay"),
    (["--clip-norm", "0"], "clip_norm"),
    (["--warmup-steps", "-1"], "warmup_steps"),
    (["--seed", "-1"], "seed"),
    (["--eval-scales", "0"], "eval_scales"),
    (["--steps", "0"], "steps"),
    (["--keep-checkpoints", "0"], "keep_checkpoints"),
    (["--eps", "0"], "eps"),
    (["--device", "gpu"], "device"),
    (["--precision", "float16"], "precision"),
    (["--num-heads", "3"], "embed_dim"),
    (["--resume", "--overwrite"], "overwrite"),
]

_CLI_ONLY = """
import contextlib, io, json, sys
from train.__main__ import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    results.append([code, err.getvalue()])
loaded = sorted(m for m in ("jax", "torch", "flax") if m in sys.modules)
print(json.dumps({"results": results, "loaded": loaded}))
"""


@pytest.fixture(scope="module")
def invalid_runs(tmp_path_factory) -> dict:
    """Every INVALID case through ``train.__main__.main`` for both commands, in one process."""
    out = tmp_path_factory.mktemp("invalid") / "run"
    argvs = [[fw, *TINY_FLAGS, "--out-dir", str(out), *flags] for fw in FRAMEWORKS for flags, _ in INVALID]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CLI_ONLY, json.dumps(argvs)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["loaded"] == []  # flag values are checked before a framework loads
    assert not out.exists()
    return {(fw, i): tuple(r) for (fw, i), r in zip([(fw, i) for fw in FRAMEWORKS for i in range(len(INVALID))],
                                                     report["results"])}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", range(len(INVALID)), ids=[" ".join(f) for f, _ in INVALID])
def test_invalid_flag_values_exit_2_naming_the_field(invalid_runs, framework, case):
    code, err = invalid_runs[framework, case]
    field = INVALID[case][1]
    assert code == 2, (code, err)
    assert f"python -m train {framework}: error: {field} " in err, err


# -- the torch twin on an explicit device, in bfloat16 autocast (in process) ---------------------


def test_torch_device_cpu_and_bfloat16_autocast(tmp_path):
    torch = pytest.importorskip("torch")
    from train.config import parse_args
    from train.torch_train import Trainer, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flags = [*TINY_FLAGS, "--device", "cpu", "--steps", "2"]
        f32 = Trainer(parse_args([*flags, "--out-dir", str(tmp_path / "f32")]))
        bf16 = Trainer(parse_args([*flags, "--out-dir", str(tmp_path / "bf16"), "--precision", "bfloat16"]))
        assert bf16.device == torch.device("cpu")
        loss32, loss16 = float(f32.step(0)[0]), float(bf16.step(0)[0])
        assert 0 < abs(loss16 - loss32) < 0.05 * loss32  # bf16 ran (not bit-equal) and stayed close
        assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # float32 master weights
        summary = train(parse_args([*flags, "--out-dir", str(tmp_path / "run"), "--precision", "bfloat16"]))
    finally:
        torch.set_num_threads(threads)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and abs(rows[0]["loss"] - math.log(12)) < 1.5
    assert 0.0 <= summary["eval"][0]["token_acc"] <= 1.0
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002.pt", weights_only=True)
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if t.is_floating_point()]
    assert {t.dtype for t in [*state["model"].values(), *moments]} == {torch.float32}  # checkpoints stay float32
    from safetensors.numpy import load_file

    assert {a.dtype.name for a in load_file(str(tmp_path / "run" / "weights.safetensors")).values()} == {"float32"}
