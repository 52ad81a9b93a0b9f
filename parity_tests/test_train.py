"""The toy-task trainers: task batches, one-step smoke tests, float64 training parity,
4-device == 1-device data parallelism, and exact resume after SIGKILL."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from train import tasks
from train.config import TrainConfig, lr_at, parse_args
from train.parity import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_torch_thread():
    """Two shared cores: torch's second thread only spins (measured 30x slower per step)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path), **kw})


# -- tasks and config (no framework) -----------------------------------------


def test_copy_batch_literal():
    tokens, targets, weights = tasks.batch("copy", seed=0, step=0, batch_size=2, length=3, vocab_size=10)
    assert tokens.shape == targets.shape == weights.shape == (2, 7)
    for tok, tgt in zip(tokens, targets):
        x = tok[1:4]
        np.testing.assert_array_equal(tok, [0, *x, 0, x[0], x[1]])  # SEP x1 x2 x3 SEP x1 x2
        np.testing.assert_array_equal(tgt, [*x, 0, *x])
        assert len(set(x.tolist())) == 3 and x.min() >= 1 and x.max() < 10
    np.testing.assert_array_equal(weights[0], [0, 0, 0, 0, 1, 1, 1])


def test_lag_batch_literal():
    tokens, targets, weights = tasks.batch("lag", seed=1, step=5, batch_size=2, length=6, vocab_size=9)
    np.testing.assert_array_equal(targets[:, tasks.LAG :], tokens[:, : -tasks.LAG])
    np.testing.assert_array_equal(weights[0], [0, 0, 0, 1, 1, 1])


def test_batches_are_a_function_of_seed_and_step():
    a = tasks.batch("copy", seed=3, step=7, batch_size=4, length=5, vocab_size=20)
    b = tasks.batch("copy", seed=3, step=7, batch_size=4, length=5, vocab_size=20)
    c = tasks.batch("copy", seed=3, step=8, batch_size=4, length=5, vocab_size=20)
    d = tasks.batch("copy", seed=3, step=7, batch_size=4, length=5, vocab_size=20, split="eval")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(task="sort"), "task must be one of"),
        (dict(length=20, vocab_size=40), r"vocab_size must be > 80"),
        (dict(precision="float16"), "precision must be"),
        (dict(position="rope"), "position must be"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(task="lag", length=2), "length must be >= 4"),
        (dict(lr=float("nan")), "lr must be finite and > 0"),
        (dict(b1=1.0), r"b1 must be in \[0, 1\)"),
        (dict(weight_decay=float("inf")), "weight_decay must be finite"),
        (dict(seed=-1), "seed must be in"),
        (dict(eval_scales=(1, 0)), "eval_scales must be one or more integers >= 1"),
        (dict(device="tpu"), "device must be auto, cpu, cuda or cuda:<index>"),
        (dict(num_heads=3), "embed_dim must be divisible by num_heads"),
        (dict(lr="0.1"), "lr must be float, got str"),
        (dict(steps=2.0), "steps must be int, got float"),
        (dict(resume=1), "resume must be bool"),
    ],
)
def test_config_errors_name_the_argument(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        TrainConfig(**kw)


def test_resume_may_change_only_steps_upward_and_logging():
    from train.rundir import changed_fields

    saved = json.loads(TrainConfig(steps=30).to_json())
    assert changed_fields(saved, TrainConfig(steps=40, log_every=5, ckpt_every=7, progress=False, resume=True,
                                             keep_checkpoints=9, device="cpu")) == []
    assert changed_fields(saved, TrainConfig(steps=20, lr=0.1, embed_dim=32)) == [
        "embed_dim: 64 -> 32", "lr: 0.003 -> 0.1", "steps: 30 -> 20 (steps may only grow)"]


def test_cli_builds_the_config():
    cfg = parse_args(["--task", "lag", "--length", "12", "--no-progress", "--eval-scales", "1", "3", "--lr", "0.01"])
    assert (cfg.task, cfg.length, cfg.progress, cfg.eval_scales, cfg.lr) == ("lag", 12, False, (1, 3), 0.01)


def test_lr_at_is_optax_warmup_cosine():
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    cfg = TrainConfig(steps=40, warmup_steps=7, lr=3e-3, end_lr_ratio=0.1)
    ref = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 7, 40, end_value=3e-4)
    for step in range(45):
        assert math.isclose(lr_at(cfg, step), float(ref(jnp.asarray(step, jnp.float64))), rel_tol=1e-12, abs_tol=1e-18)


# -- one-step smoke tests of each trainer ------------------------------------


def _check_run(out: Path, summary: dict, vocab: int, steps: int = 1):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert abs(rows[0]["loss"] - math.log(vocab)) < 1.5  # an untrained model is near uniform
    assert rows[0]["tokens_per_s"] > 0
    assert (out / "weights.safetensors").stat().st_size > 0 and (out / "curves.png").exists()
    assert [r["length"] for r in summary["eval"]] == [4]
    assert 0.0 <= summary["eval"][0]["token_acc"] <= 1.0


def test_jax_trainer_smoke(tmp_path):
    pytest.importorskip("flax")
    from train.jax_train import train, train_step

    cfg = tiny(tmp_path, steps=3, log_every=1, precision="float32", num_layers=1)
    compiled = train_step.jitted_fn._cache_size()
    summary = train(cfg)
    assert train_step.jitted_fn._cache_size() - compiled <= 1  # traced once, not once per step
    _check_run(tmp_path, summary, cfg.vocab_size, steps=3)
    assert summary["devices"] >= 1


def test_torch_trainer_one_step(tmp_path, one_torch_thread):
    from train.torch_train import train

    cfg = tiny(tmp_path, steps=1, log_every=1, precision="float32")
    summary = train(cfg)
    _check_run(tmp_path, summary, cfg.vocab_size)
    assert (tmp_path / "checkpoints" / "step_00000001.pt").exists()
    assert json.loads((tmp_path / "config.json").read_text()) == {**json.loads(cfg.to_json()), "framework": "torch"}


def test_resume_compares_the_checkpoint_config(tmp_path, one_torch_thread):
    """Without config.json (a run from before it existed) the checkpoint's own config is compared."""
    from train.rundir import RunError
    from train.torch_train import train

    cfg = tiny(tmp_path, steps=1, log_every=1, precision="float32")
    train(cfg)
    (tmp_path / "config.json").unlink()
    with pytest.raises(RunError, match=r"weight_decay: 0.01 -> 0.5\. Only --steps"):
        train(tiny(tmp_path, steps=1, log_every=1, precision="float32", weight_decay=0.5, resume=True))


def test_torch_clipping_matches_optax_rule():
    torch = pytest.importorskip("torch")
    from train.torch_train import clip_by_global_norm_

    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert float(clip_by_global_norm_([p], 1.0)) == 5.0
    np.testing.assert_array_equal(p.grad.numpy(), [0.6, 0.8])  # exactly g / |g|: no 1e-6 in the denominator
    p.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
    clip_by_global_norm_([p], 1.0)
    np.testing.assert_array_equal(p.grad.numpy(), [0.3, 0.4])


# -- training parity: one weight file, same batches, float64 ------------------


def test_training_parity_float64(tmp_path, one_torch_thread):
    pytest.importorskip("flax")
    from train.parity import run_parity

    result = run_parity(tiny(tmp_path, precision="float64"), 50, tmp_path / "init.safetensors")
    jax_loss, torch_loss = np.array(result["jax_loss"]), np.array(result["torch_loss"])
    assert jax_loss[-1] < jax_loss[0] - 0.3  # it trains
    np.testing.assert_allclose(jax_loss, torch_loss, rtol=1e-9, atol=0)
    worst = max(result["weight_diff"], key=result["weight_diff"].get)
    assert result["weight_diff"][worst] <= 1e-9, (worst, result["weight_diff"][worst])


# -- subprocess runs: 4 XLA host devices, SIGKILL and resume ----------------------

_RUN = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    import jax
    from train.config import TrainConfig
    from train.jax_train import train
    runs = json.loads({runs!r})
    out = []
    for kw in runs:
        devices = jax.devices()[: kw.pop("n_devices", len(jax.devices()))]
        summary = train(TrainConfig(**kw), devices=devices)
        out.append({{"summary": summary, "metrics": open(kw["out_dir"] + "/metrics.jsonl").read()}})
    print("RESULT" + json.dumps(out))
    """
)


def _run_jax(runs: list[dict], n_host_devices: int = 1, expect_kill: bool = False, cache_dir=None):
    flags = f"--xla_force_host_platform_device_count={n_host_devices} --xla_backend_optimization_level=0"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}  # -O0: tiny programs, compile time dominates
    if cache_dir is not None:  # the killed, resumed and reference runs compile the same programs once
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    code = _RUN.format(root=str(ROOT), runs=json.dumps(runs))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert proc.returncode == -9, proc.stderr[-2000:]
        return None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def _tiny_kw(out, **kw):
    cfg = dict(TINY, out_dir=str(out), num_layers=1, eval_scales=[1], eval_batches=1, log_every=1, batch_size=8, **kw)
    return cfg


def test_four_devices_match_one_device(tmp_path):
    pytest.importorskip("flax")
    kw = dict(steps=6, ckpt_every=100)
    four, one = _run_jax([_tiny_kw(tmp_path / "d4", **kw), _tiny_kw(tmp_path / "d1", n_devices=1, **kw)], 4)
    assert four["summary"]["devices"] == 4 and one["summary"]["devices"] == 1
    loss4 = [json.loads(r)["loss"] for r in four["metrics"].splitlines()]
    loss1 = [json.loads(r)["loss"] for r in one["metrics"].splitlines()]
    assert len(loss4) == 6
    np.testing.assert_allclose(loss4, loss1, rtol=2e-5)
    for a, b in zip(four["summary"]["eval"], one["summary"]["eval"]):
        assert a["token_acc"] == pytest.approx(b["token_acc"], abs=1 / 64)


def test_sigkill_then_resume_is_exact(tmp_path):
    pytest.importorskip("flax")
    kw = dict(steps=12, ckpt_every=4)
    # Killed by SIGKILL right after step 10: the last checkpoint is step 8.
    cache = tmp_path / "xla_cache"
    _run_jax([_tiny_kw(tmp_path / "run", crash_at_step=10, **kw)], expect_kill=True, cache_dir=cache)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 8
    resumed, straight = _run_jax(
        [_tiny_kw(tmp_path / "run", resume=True, **kw), _tiny_kw(tmp_path / "ref", **kw)], cache_dir=cache
    )
    rows = [json.loads(r) for r in resumed["metrics"].splitlines()]
    ref = [json.loads(r) for r in straight["metrics"].splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))  # rows 9-10 of the killed run were replaced
    assert [(r["loss"], r["acc"]) for r in rows] == [(r["loss"], r["acc"]) for r in ref]  # bit-for-bit
    assert resumed["summary"]["eval"] == straight["summary"]["eval"]
    a = (tmp_path / "run" / "weights.safetensors").read_bytes()
    assert a == (tmp_path / "ref" / "weights.safetensors").read_bytes()


# -- the DecoderLM twins ---------------------------------------------------------

@functools.cache
def _jit_forward():
    """One jitted forward for the JAX twin (one compile instead of many eager op compiles)."""
    from flax import nnx

    return nnx.jit(lambda model, tokens, cache: model(tokens) if cache is None else model(tokens, cache=cache))


def _jax_call(model, tokens, cache=None):
    import jax.numpy as jnp

    return _jit_forward()(model, jnp.asarray(tokens), cache)


DEC = dict(vocab_size=11, embed_dim=16, num_heads=2, num_layers=2, mlp_dim=24, max_distance=3, max_len=20)


def _twins(position, tmp_path):
    """A JAX DecoderLM (float64) and a torch one loaded from its weight file."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("flax")
    import jax.numpy as jnp
    from flax import nnx

    import relattn_jax as rj
    import relattn_torch as rt

    jm = rj.DecoderLM(rj.DecoderConfig(**DEC, position=position), param_dtype=jnp.float64, rngs=nnx.Rngs(3))
    tm = rt.DecoderLM(rt.DecoderConfig(**DEC, position=position), dtype=torch.float64)
    rj.save_weights(jm, tmp_path / "w.safetensors")
    rt.load_weights(tm, tmp_path / "w.safetensors")  # strict: every name and shape must match
    return jm, tm.eval()


@pytest.mark.parametrize("position", ["relative", "absolute"])
def test_decoder_twins_same_names_and_logits(position, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("jax")
    import jax.numpy as jnp

    jm, tm = _twins(position, tmp_path)
    names = {n: tuple(p.shape) for n, p in tm.named_parameters()}
    assert names["tok_emb"] == (11, 16) and names["head"] == (16, 11)
    assert names["blocks.1.mlp.w_in"] == (16, 24) and names["blocks.0.ln1.scale"] == (16,)
    assert ("pos_emb" in names) == (position == "absolute")
    assert ("blocks.0.attn.rel_k" in names) == (position == "relative")
    tokens = np.random.default_rng(0).integers(0, 11, (3, 9))
    a = np.asarray(_jax_call(jm, tokens))
    b = tm(torch.from_numpy(tokens)).detach().numpy()
    assert a.shape == (3, 9, 11)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("position", ["relative", "absolute"])
def test_decoder_cache_continues_the_sequence(position, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("jax")
    import jax.numpy as jnp

    jm, tm = _twins(position, tmp_path)
    tokens = np.random.default_rng(1).integers(0, 11, (2, 9))
    full = np.asarray(_jax_call(jm, tokens))
    cache = jm.init_cache(2, 12)
    l1, cache = _jax_call(jm, tokens[:, :5], cache)
    l2, cache = _jax_call(jm, tokens[:, 5:], cache)
    np.testing.assert_allclose(np.concatenate([l1, l2], 1), full, atol=1e-12)
    cache = tm.init_cache(2, 12)
    with torch.no_grad():
        l1, cache = tm(torch.from_numpy(tokens[:, :5]), cache=cache)
        l2, cache = tm(torch.from_numpy(tokens[:, 5:]), cache=cache)
    np.testing.assert_allclose(torch.cat([l1, l2], 1).numpy(), full, atol=1e-12)


def test_decoder_greedy_generation_agrees(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("jax")
    import jax.numpy as jnp

    import relattn_jax as rj
    import relattn_torch as rt

    jm, tm = _twins("relative", tmp_path)
    prompt = np.random.default_rng(2).integers(0, 11, (2, 4))
    a = np.asarray(rj.generate(jm, jnp.asarray(prompt), 6))
    with torch.no_grad():
        b = rt.generate(tm, torch.from_numpy(prompt), 6).numpy()
    np.testing.assert_array_equal(a, b)


def test_decoder_errors_name_the_argument(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("jax")
    import jax.numpy as jnp

    jm, tm = _twins("absolute", tmp_path)
    with pytest.raises(TypeError, match="tokens must be an integer"):
        jm(jnp.zeros((1, 3)))
    with pytest.raises(TypeError, match="tokens must be an integer"):
        tm(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"tokens length T must be <= max_len \(20\).*got 21"):
        jm(jnp.zeros((1, 21), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\], got shape \[4\]"):
        tm(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="position must be 'relative' or 'absolute'"):
        pytest.importorskip("relattn_torch").DecoderConfig(position="rope")


def test_decoder_bfloat16_compute_is_close_to_float32():
    pytest.importorskip("flax")
    import jax.numpy as jnp
    from flax import nnx

    import relattn_jax as rj

    cfg = rj.DecoderConfig(**DEC)
    m32 = rj.DecoderLM(cfg, rngs=nnx.Rngs(0))
    m16 = rj.DecoderLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # same float32 parameters
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 11, (2, 7)))
    a, b = _jax_call(m32, tokens), _jax_call(m16, tokens)
    assert b.dtype == jnp.float32 and m16.tok_emb[...].dtype == jnp.float32
    err = float(jnp.abs(a - b).max() / jnp.abs(a).max())
    assert 0 < err < 5e-2  # bf16 really ran (not bit-equal) and stayed close


# -- slow: torchrun DDP (gloo) and torch.compile give the single-process numbers -------


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "compile"])
def test_torch_ddp_and_compile_match_eager(tmp_path, launcher):
    pytest.importorskip("torch")
    flags = ["--steps", "6", "--log-every", "1", "--eval-scales", "1", "--no-progress", "--batch-size", "8",
             "--length", "4", "--vocab-size", "12", "--embed-dim", "16", "--mlp-dim", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    runs = {"eager": [sys.executable, "-m", "train", "torch"],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "train", "torch"],
            "compile": [sys.executable, "-m", "train", "torch", "--compile"]}
    losses = {}
    for name in ("eager", launcher):
        out = tmp_path / name
        proc = subprocess.run(runs[name] + flags + ["--out-dir", str(out)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[name] = [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["eager"]) == 6
    np.testing.assert_allclose(losses[launcher], losses["eager"], rtol=1e-5)


def test_torch_sigkill_then_resume_is_exact(tmp_path, one_torch_thread):
    from train.torch_train import train

    flags = ["--steps", "6", "--ckpt-every", "4", "--log-every", "1", "--eval-scales", "1", "--no-progress",
             "--batch-size", "4", "--length", "4", "--vocab-size", "12", "--embed-dim", "16", "--mlp-dim", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "train", "torch", *flags, "--crash-at-step", "5", "--out-dir", str(run)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = train(parse_args([*flags, "--resume", "--out-dir", str(run)]))
    straight = train(parse_args([*flags, "--out-dir", str(tmp_path / "ref")]))
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(r) for r in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    assert resumed["eval"] == straight["eval"]
    assert (run / "weights.safetensors").read_bytes() == (tmp_path / "ref" / "weights.safetensors").read_bytes()
