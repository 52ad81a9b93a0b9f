"""Multi-process training on one machine, over 127.0.0.1 only: two JAX processes
(``python -m train jax --distributed``: ``jax.distributed`` with gloo CPU collectives, one CPU
device each; ``--slow``: two forced host devices each) and two torchrun nodes of one rank each
(DDP, gloo), against the single-process run of the same flags.

Every run is a set of subprocesses on ports chosen free at run time, each with a timeout; the
process groups (and torchrun's workers, which start their own sessions) are killed in ``finally``,
so no test leaves a process behind. Checked for each trainer:

- the per-step losses, the eval table and the weight file equal the single-process run's within
  the float32 bound of the 4-device test (``test_train.py``, rtol 2e-5); the weight file is written
  once and loads into both packages, which give the same logits;
- process 0 alone writes: one metrics row per step (two processes used to append two), the
  evaluation table printed by process 0 only;
- every process killed with SIGKILL after a checkpoint, then all restarted with ``--resume``: the
  same losses, eval table and weight-file bytes as the uninterrupted multi-process run;
- one process killed: the other stops within seconds with exit 1 and a message naming the kept
  checkpoint, which equals the uninterrupted run's checkpoint of that step.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from train.config import lr_at, parse_args

ROOT = Path(__file__).resolve().parents[1]
STEPS, CKPT_EVERY, KILL_AT = 6, 2, 5  # killed after step 5: the newest checkpoint is step 4
FLAGS = ["--length", "4", "--vocab-size", "12", "--embed-dim", "16", "--num-heads", "2", "--num-layers", "1",
         "--mlp-dim", "32", "--max-distance", "2", "--batch-size", "8", "--warmup-steps", "5", "--lr", "1e-2",
         "--eval-scales", "1", "--eval-batches", "1", "--log-every", "1", "--ckpt-every", str(CKPT_EVERY),
         "--steps", str(STEPS), "--no-progress"]
PEER_TIMEOUT = 60  # --peer-timeout of the runs: a lost peer must be noticed long before it
RTOL = 2e-5  # test_train.py::test_four_devices_match_one_device (float32, reordered sums)
TIMEOUT = 240  # seconds, for every subprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str
    ended: float  # time.monotonic() when it was seen to exit


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing or the process is gone
        return []


def _run_group(argvs: list[list[str]], envs: list[dict], logs: Path, timeout: int = TIMEOUT, watch=None,
               wait_for=None) -> list[Proc]:
    """Start every command at once (each in its own session), wait for them, kill whatever is left.

    ``watch(popens)`` is called while they run; ``wait_for``: the indices to wait for (default all),
    the others are killed once these have ended (their ``returncode`` is then None).
    """
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    try:
        for i, (argv, env) in enumerate(zip(argvs, envs)):
            out, err = open(logs / f"{i}.out", "w+"), open(logs / f"{i}.err", "w+")
            files += [out, err]
            procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=err, start_new_session=True))
        deadline, ended = time.monotonic() + timeout, {}
        waited = set(range(len(procs)) if wait_for is None else wait_for)
        while not waited <= set(ended) and time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic()
            if watch is not None:
                watch(procs)
            time.sleep(0.05)
        if not waited <= set(ended):
            pytest.fail(f"a process of {argvs[0][:6]} ... ran past {timeout} s")
        results = []
        for i, p in enumerate(procs):
            files[2 * i].seek(0), files[2 * i + 1].seek(0)
            results.append(Proc(p.returncode if i in ended else None, files[2 * i].read(), files[2 * i + 1].read(),
                                ended.get(i, float("nan"))))
        return results
    finally:
        for p in procs:  # torchrun's workers start sessions of their own: find them before their parent dies
            left = [p, *_descendants(p.pid)] if p.poll() is None else _descendants(p.pid)
            for q in left:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            p.wait(timeout=30)
        for f in files:
            f.close()


class StopWhen:
    """A ``watch``: SIGSTOP process ``index`` (under torchrun: its worker) once ``path`` exists."""

    def __init__(self, path: Path, index: int):
        self.path, self.index, self.at = path, index, None

    def __call__(self, popens) -> None:
        if self.at is None and self.path.exists():
            workers = _descendants(popens[self.index].pid)
            os.kill(workers[-1].pid if workers else popens[self.index].pid, signal.SIGSTOP)
            self.at = time.monotonic()


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **extra}


def _jax_env(cache: Path, host_devices: int = 1, **extra) -> dict:
    flags = f"--xla_force_host_platform_device_count={host_devices} --xla_backend_optimization_level=0"
    return _env(JAX_PLATFORMS="cpu", XLA_FLAGS=flags, JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)


def jax_processes(out: Path, cache: Path, *flags, own=None, host_devices: int = 1, started=(0, 1),
                  peer_timeout: int = PEER_TIMEOUT, **group) -> list[Proc]:
    """``python -m train jax --distributed``: the processes ``started`` of a 2-process run on 127.0.0.1.

    ``own`` maps a process id to flags for that process alone.
    """
    port = _free_port()
    argvs, envs = [], []
    for i in started:
        argvs.append([sys.executable, "-m", "train", "jax", "--distributed", *FLAGS, "--out-dir", str(out),
                      "--peer-timeout", str(peer_timeout), *flags, *(own or {}).get(i, ())])
        envs.append(_jax_env(cache, host_devices, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
    return _run_group(argvs, envs, out.with_name(out.name + f"-logs-{port}"), **group)


def torch_nodes(out: Path, *flags, own=None, peer_timeout: int = PEER_TIMEOUT, **group) -> list[Proc]:
    """Two torchrun nodes of one rank each (static rendezvous on 127.0.0.1: node i is rank i).

    ``own`` maps a node rank to flags for that node alone.
    """
    port = _free_port()
    argvs = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
              "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
              "--max-restarts", "0", "-m", "train", "torch", *FLAGS, "--out-dir", str(out),
              "--peer-timeout", str(peer_timeout), *flags, *(own or {}).get(i, ())] for i in (0, 1)]
    return _run_group(argvs, [_env()] * len(argvs), out.with_name(out.name + f"-logs-{port}"), **group)


def single(framework: str, out: Path, cache: Path, host_devices: int = 1) -> Proc:
    argv = [sys.executable, "-m", "train", framework, *FLAGS, "--out-dir", str(out)]
    env = _jax_env(cache, host_devices) if framework == "jax" else _env()
    return _run_group([argv], [env], out.with_name(out.name + "-logs"))[0]


def _ok(procs: list[Proc]) -> list[Proc]:
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    return procs


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def eval_rows(out: Path) -> list[dict]:
    return json.loads((out / "eval.json").read_text())


def _weights(path: Path) -> dict:
    """{name: float64 array} of a weight file, read by the PyTorch package into the run's model."""
    from relattn_torch.weights import load_weights
    from train.torch_train import build_model

    model = build_model(parse_args(FLAGS))
    load_weights(model, path)
    return {n: p.detach().double().numpy() for n, p in model.named_parameters()}


@functools.cache
def _jax_forward():
    """The jitted forward pass: one compile for every model of the same shapes, not one per op."""
    from flax import nnx

    return nnx.jit(lambda model, tokens: model(tokens))


def _same_logits_in_both_packages(path: Path) -> np.ndarray:
    """The weight file loads (strictly) into both DecoderLMs, which give the same logits (returned)."""
    import jax.numpy as jnp
    import torch

    from relattn_jax.weights import load_weights as load_jax
    from relattn_torch.weights import load_weights as load_torch
    from train import jax_train, torch_train

    cfg = parse_args(FLAGS)
    jm, tm = jax_train.build_model(cfg), torch_train.build_model(cfg)
    load_jax(jm, path)
    load_torch(tm, path)
    tokens = np.random.default_rng(0).integers(0, 12, (2, 9))
    a = np.asarray(_jax_forward()(jm, jnp.asarray(tokens)))
    with torch.no_grad():
        b = tm.eval()(torch.from_numpy(tokens)).numpy()
    assert a.shape == (2, 9, 12)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)
    return b


def _checkpoint_arrays(step_dir: Path) -> dict:
    """{path: array} of one orbax checkpoint's state, read as NumPy (no devices needed)."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}


def _matches_single(multi: Path, one: Path) -> None:
    """Losses, eval table and weights of a multi-process run against the single-process run's."""
    rows, ref = metrics(multi), metrics(one)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one row per step: process 0 alone writes
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref], rtol=RTOL)
    assert [r["acc"] for r in rows] == [r["acc"] for r in ref]
    for a, b in zip(eval_rows(multi), eval_rows(one), strict=True):
        assert a["token_acc"] == pytest.approx(b["token_acc"], abs=1 / 64)  # as the 4-device test
    got, want = _weights(multi / "weights.safetensors"), _weights(one / "weights.safetensors")
    # b_k has no gradient in exact arithmetic (docs/training.md): Adam turns rounding noise into steps
    # of up to about the learning rate, so it is bounded by their sum; the logits do not depend on it.
    lr_sum = sum(lr_at(parse_args(FLAGS), step) for step in range(STEPS))
    for name in want:
        if name.endswith("b_k"):
            assert np.abs(got[name] - want[name]).max() <= lr_sum, name
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=1e-6, err_msg=name)
    logits = _same_logits_in_both_packages(multi / "weights.safetensors")
    np.testing.assert_allclose(logits, _same_logits_in_both_packages(one / "weights.safetensors"), rtol=RTOL, atol=1e-6)


# -- JAX: two processes of one CPU device each -------------------------------------------------


@pytest.fixture(scope="module")
def jax_runs(tmp_path_factory):
    """{"one": single process, "two": 2 processes, "resumed": 2 processes killed after step 5 then
    resumed, "lost": process 1 killed after step 3}: their directories, and the processes' results."""
    pytest.importorskip("orbax.checkpoint")
    base = tmp_path_factory.mktemp("multihost_jax")
    cache = base / "xla_cache"
    runs = {name: base / name for name in ("one", "two", "resumed", "lost")}
    procs = {"one": [single("jax", runs["one"], cache)]}
    procs["two"] = jax_processes(runs["two"], cache)
    procs["killed"] = jax_processes(runs["resumed"], cache, "--crash-at-step", str(KILL_AT))
    procs["resumed"] = jax_processes(runs["resumed"], cache, "--resume")
    procs["lost"] = jax_processes(runs["lost"], cache, own={1: ("--crash-at-step", "3")})
    return runs, procs


def test_jax_two_processes_match_one_process(jax_runs):
    runs, procs = jax_runs
    _ok(procs["one"] + procs["two"])
    _matches_single(runs["two"], runs["one"])
    summary = json.loads((runs["two"] / "summary.json").read_text())
    assert summary["devices"] == 2  # one mesh over both processes' devices
    # Process 0 alone writes the run's files; its stdout holds the eval table, process 1's does not.
    assert "| jax relative |" in procs["two"][0].stdout and "| jax relative |" not in procs["two"][1].stdout


def test_jax_sigkill_all_then_resume_is_exact(jax_runs):
    runs, procs = jax_runs
    assert [p.returncode for p in procs["killed"]] == [-signal.SIGKILL] * 2
    _ok(procs["resumed"])
    rows, ref = metrics(runs["resumed"]), metrics(runs["two"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # row 5 of the killed run was replaced
    assert [(r["loss"], r["acc"]) for r in rows] == [(r["loss"], r["acc"]) for r in ref]  # bit-for-bit
    assert eval_rows(runs["resumed"]) == eval_rows(runs["two"])
    assert (runs["resumed"] / "weights.safetensors").read_bytes() == (runs["two"] / "weights.safetensors").read_bytes()


def test_jax_lost_process_stops_the_other_and_keeps_the_checkpoint(jax_runs):
    runs, procs = jax_runs
    p0, p1 = procs["lost"]
    assert p1.returncode == -signal.SIGKILL
    assert p0.returncode == 1, p0.stderr[-3000:]
    assert p0.ended - p1.ended < PEER_TIMEOUT / 2  # noticed through the broken connection, not a timeout
    assert "another process stopped or cannot be reached" in p0.stderr
    assert f"{runs['lost']}/checkpoints/2" in p0.stderr and "--resume" in p0.stderr
    assert not (runs["lost"] / "weights.safetensors").exists()
    assert sorted(int(p.name) for p in (runs["lost"] / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    kept, ref = _checkpoint_arrays(runs["lost"] / "checkpoints" / "2"), _checkpoint_arrays(runs["two"] / "checkpoints" / "2")
    assert kept.keys() == ref.keys() and len(kept) > 10
    for k in ref:
        np.testing.assert_array_equal(kept[k], ref[k], err_msg=k)


def test_jax_refused_directory_stops_every_process(tmp_path):
    """Process 0 refuses a directory that holds something else; process 1 follows its decision."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("not a run")
    p0, p1 = jax_processes(out, tmp_path / "xla_cache")
    assert p0.returncode == p1.returncode == 1, (p0.stderr[-2000:], p1.stderr[-2000:])
    assert f"out_dir {out} is not empty (notes.txt)" in p0.stderr
    assert f"process 0 refused --out-dir {out} (see its message)" in p1.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_jax_process_without_its_peer_stops(tmp_path):
    """Process 1 started alone: no coordinator answers, and JAX stops it soon after --peer-timeout."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    (p1,) = jax_processes(out, tmp_path / "xla_cache", started=(1,), peer_timeout=5)
    assert p1.returncode != 0 and p1.ended - t0 < 60, p1.stderr[-3000:]
    assert "waiting up to --peer-timeout 5 s for the other processes" in p1.stderr  # ours, before JAX aborts
    assert "DEADLINE_EXCEEDED" in p1.stderr  # JAX's: the coordinator was not reached in time
    assert not out.exists()  # nothing was written


@pytest.mark.slow
def test_jax_two_processes_of_two_devices_match_one_device(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    cache = tmp_path / "xla_cache"
    _ok([single("jax", tmp_path / "one", cache)])
    _ok(jax_processes(tmp_path / "two", cache, host_devices=2))
    _matches_single(tmp_path / "two", tmp_path / "one")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["devices"] == 4


@pytest.mark.slow
def test_jax_hung_process_stops_the_other(tmp_path):
    """Process 1 stopped (SIGSTOP) after checkpoint 2: it sends no heartbeats, and JAX's coordination
    service stops process 0 (SIGABRT) within --peer-timeout; the checkpoints are kept."""
    pytest.importorskip("orbax.checkpoint")
    out = tmp_path / "run"
    stop = StopWhen(out / "checkpoints" / "2", 1)
    p0, _ = jax_processes(out, tmp_path / "xla_cache", peer_timeout=15, watch=stop, wait_for=[0])
    assert stop.at is not None and p0.returncode == -signal.SIGABRT, p0.stderr[-3000:]
    assert p0.ended - stop.at < 15 + 10
    assert "stopped sending heartbeats" in p0.stderr
    assert 2 in [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]


@pytest.mark.slow
def test_jax_lost_coordinator_stops_the_other(tmp_path):
    """Process 0 (it runs the coordination service) killed after step 3: process 1 stops soon.

    Two things race there: the broken gloo connection (exit 1 with this trainer's message) and JAX's
    error poller, which aborts the process when the coordinator is gone (SIGABRT, JAX's message)."""
    pytest.importorskip("orbax.checkpoint")
    p0, p1 = jax_processes(tmp_path / "run", tmp_path / "xla_cache", own={0: ("--crash-at-step", "3")})
    assert p0.returncode == -signal.SIGKILL
    assert p1.returncode in (1, -signal.SIGABRT), p1.stderr[-3000:]
    assert p1.ended - p0.ended < PEER_TIMEOUT / 2
    assert ("another process stopped or cannot be reached" in p1.stderr
            or "JAX distributed service detected fatal errors" in p1.stderr)
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [2]


# -- PyTorch: two torchrun nodes of one rank each --------------------------------------------


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    """As ``jax_runs``, with ``torchrun --nnodes 2 --nproc-per-node 1`` on 127.0.0.1."""
    pytest.importorskip("torch")
    base = tmp_path_factory.mktemp("multihost_torch")
    runs = {name: base / name for name in ("one", "two", "resumed", "lost")}
    procs = {"one": [single("torch", runs["one"], base)]}
    procs["two"] = torch_nodes(runs["two"])
    procs["killed"] = torch_nodes(runs["resumed"], "--crash-at-step", str(KILL_AT))
    procs["resumed"] = torch_nodes(runs["resumed"], "--resume")
    procs["lost"] = torch_nodes(runs["lost"], own={1: ("--crash-at-step", "3")})
    return runs, procs


def test_torch_two_nodes_match_one_process(torch_runs):
    runs, procs = torch_runs
    _ok(procs["one"] + procs["two"])
    _matches_single(runs["two"], runs["one"])
    assert json.loads((runs["two"] / "summary.json").read_text())["world_size"] == 2
    assert "| torch relative |" in procs["two"][0].stdout and "| torch relative |" not in procs["two"][1].stdout


def test_torch_sigkill_all_then_resume_is_exact(torch_runs):
    runs, procs = torch_runs
    for p in procs["killed"]:  # torchrun reports its worker's SIGKILL and exits 1
        assert p.returncode == 1 and "Signal 9 (SIGKILL)" in p.stderr, p.stderr[-3000:]
    _ok(procs["resumed"])
    rows, ref = metrics(runs["resumed"]), metrics(runs["two"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["acc"]) for r in rows] == [(r["loss"], r["acc"]) for r in ref]
    assert eval_rows(runs["resumed"]) == eval_rows(runs["two"])
    assert (runs["resumed"] / "weights.safetensors").read_bytes() == (runs["two"] / "weights.safetensors").read_bytes()


def test_torch_lost_node_stops_the_other_and_keeps_the_checkpoint(torch_runs):
    import torch

    runs, procs = torch_runs
    n0, n1 = procs["lost"]
    assert n1.returncode == 1 and "Signal 9 (SIGKILL)" in n1.stderr
    assert n0.returncode == 1, n0.stderr[-3000:]
    assert n0.ended - n1.ended < PEER_TIMEOUT / 2
    kept = runs["lost"] / "checkpoints" / "step_00000002.pt"
    assert "another process stopped or cannot be reached" in n0.stderr and str(kept) in n0.stderr
    assert not (runs["lost"] / "weights.safetensors").exists()
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]
    a = torch.load(kept, weights_only=True)
    b = torch.load(runs["two"] / "checkpoints" / kept.name, weights_only=True)
    assert a["step"] == b["step"] == 2
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


@pytest.mark.slow
def test_torch_lost_rank_0_stops_the_other(tmp_path):
    """Node 0 (its agent holds the rendezvous store) loses its rank after step 3: node 1 stops soon."""
    pytest.importorskip("torch")
    n0, n1 = torch_nodes(tmp_path / "run", own={0: ("--crash-at-step", "3")})
    assert n0.returncode == 1 and "Signal 9 (SIGKILL)" in n0.stderr
    assert n1.returncode == 1 and n1.ended - n0.ended < PEER_TIMEOUT / 2, n1.stderr[-3000:]
    assert "another process stopped or cannot be reached" in n1.stderr and "step_00000002.pt" in n1.stderr


@pytest.mark.slow
def test_torch_hung_rank_stops_the_other(tmp_path):
    """Rank 1 stopped (SIGSTOP) after checkpoint 2: rank 0's collective times out after --peer-timeout."""
    pytest.importorskip("psutil")  # finds torchrun's worker
    out = tmp_path / "run"
    stop = StopWhen(out / "checkpoints" / "step_00000002.pt", 1)
    n0, _ = torch_nodes(out, peer_timeout=15, watch=stop, wait_for=[0])
    assert stop.at is not None and n0.returncode == 1, n0.stderr[-3000:]
    assert 15 - 1 < n0.ended - stop.at < 15 + 15
    assert "another process stopped or cannot be reached" in n0.stderr and "Timed out" in n0.stderr
    assert (out / "checkpoints" / "step_00000002.pt").exists()
