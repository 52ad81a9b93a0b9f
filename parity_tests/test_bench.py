"""The benchmark contestants compute the function they claim to, so the bench compares like with like.

Each peer in ``bench/peers_{torch,jax}.py`` is run on small float64 inputs and compared with our
einsum path (itself checked against the oracle in test_core), and one tiny benchmark group runs
end to end through ``bench.case`` (timing rows and a memory row), as ``bench.run`` runs it.
"""

from __future__ import annotations

import numpy as np
import pytest

from .numerics import assert_close

B, T, N, H, K = 2, 7, 2, 4, 2


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = {n: rng.standard_normal((B, T, N, H)) for n in ("q", "k", "v")}
    x["rel_k"], x["rel_v"] = rng.standard_normal((2 * K + 1, H)), rng.standard_normal((2 * K + 1, H))
    return x


def _dense_inputs(seed=1):
    rng = np.random.default_rng(seed)
    x = {"X": rng.standard_normal((B, T, N, H))}
    x.update({w: rng.standard_normal((N, H, H)) for w in ("W_Q", "W_K", "W_V")})
    x["a_K"], x["a_V"] = rng.standard_normal((T, T, N, H)), rng.standard_normal((T, T, N, H))
    return x


def torch_lib():
    import relattn_torch

    return relattn_torch


@pytest.mark.parametrize("causal", [False, True])
def test_torch_peers_match_ours(causal):
    torch = pytest.importorskip("torch")
    from bench import peers_torch as P

    x = {n: torch.from_numpy(a) for n, a in _inputs().items()}
    ours = P.ours(**x, K=K, causal=causal).numpy()
    assert_close(P.naive_shaw(**x, K=K, causal=causal).numpy(), ours)
    keys_only = P.ours(**{**x, "rel_v": None}, K=K, causal=causal).numpy()
    assert_close(P.hf_relative_key(x["q"], x["k"], x["v"], x["rel_k"], K=K, causal=causal).numpy(), keys_only)
    plain = torch_lib().relative_attention(x["q"], x["k"], x["v"], is_causal=causal).numpy()
    assert_close(P.floor(x["q"], x["k"], x["v"], causal=causal).numpy(), plain)
    assert not np.allclose(ours, plain)  # the relative terms matter at these sizes


def test_torch_seed1_peer_matches_ours_dense():
    torch = pytest.importorskip("torch")
    from bench import peers_torch as P

    x = {n: torch.from_numpy(a) for n, a in _dense_inputs().items()}
    assert_close(P.seed1(**x).numpy(), P.ours_dense(**x).numpy())


@pytest.mark.parametrize("causal", [False, True])
def test_jax_peers_match_ours(causal):
    pytest.importorskip("jax")
    from bench import peers_jax as P

    x = _inputs()
    ours = np.asarray(P.ours(**x, K=K, causal=causal))
    assert_close(np.asarray(P.naive_shaw(**x, K=K, causal=causal)), ours)
    keys_only = np.asarray(P.ours(**{**x, "rel_v": None}, K=K, causal=causal))
    assert_close(np.asarray(P.hf_relative_key(x["q"], x["k"], x["v"], x["rel_k"], K=K, causal=causal)), keys_only)
    dense = _dense_inputs()
    assert_close(np.asarray(P.seed1(**dense)), np.asarray(P.ours_dense(**dense)))


def test_jax_floor_peer_is_plain_attention():
    pytest.importorskip("jax")
    from bench import peers_jax as P

    x = _inputs()
    import relattn_jax

    plain = np.asarray(relattn_jax.relative_attention(x["q"], x["k"], x["v"], is_causal=True))
    # jax.nn.dot_product_attention computes its softmax in float32 whatever the input dtype
    np.testing.assert_allclose(np.asarray(P.floor(x["q"], x["k"], x["v"], causal=True)), plain, atol=1e-6)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bench_case_runs_a_group(framework):
    pytest.importorskip(framework)
    from bench import case

    spec = dict(framework=framework, case=dict(B=1, S=32, N=2, H=8, K=2, causal=False, mode="fwdbwd"),
                impls=["ours", "floor", "naive_shaw", "no_such_peer"], repeats=2)
    res = case.main(spec)
    for n in ("ours", "floor", "naive_shaw"):
        assert len(res[n]["times_s"]) == 2 and res[n]["median_s"] > 0, n
    assert "error" in res["no_such_peer"] and "median_s" not in res["no_such_peer"]


def test_bench_case_memory_is_measured_against_each_contestants_own_baseline():
    """naive_shaw holds [B, N, S, S] float32 logits (32 MiB at B, N, S = 1, 2, 2048) and runs first:
    its peak is counted from its own baseline, whatever runs after it in the process (against the
    last contestant's baseline it read 3 MiB). In a process of its own, whose peak (VmHWM) does
    not start at this test runner's size."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    spec = dict(framework="torch", case=dict(B=1, S=2048, N=2, H=8, K=2, causal=False, mode="fwd"),
                impls=["naive_shaw", "floor"], repeats=1, memory=True, threads=1)
    root = Path(__file__).parents[1]
    run = subprocess.run([sys.executable, "-m", "bench.case", json.dumps(spec)], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    mem = json.loads(run.stdout.strip().splitlines()[-1])
    logits_mib = 1 * 2 * 2048 * 2048 * 4 / 2**20
    assert mem["naive_shaw"]["peak_mib"] >= logits_mib, mem
    assert mem["floor"]["peak_mib"] >= 0, mem


def test_report_gives_time_ratios_only_within_one_run(tmp_path):
    """Merged runs: a later run's row replaces an earlier one; x-the-floor needs both rows from one run."""
    import json

    from bench import report

    def row(impl, S, t, mib):
        return {"framework": "torch", "impl": impl, "S": S, "causal": False, "mode": "fwd", "median_s": t, "peak_mib": mib}

    runs = {"a": [row("floor", 256, 1.0, 10.0), row("ours", 256, 2.0, 30.0), row("ours", 512, 8.0, 40.0),
                  row("floor", 512, 4.0, 20.0)],
            "b": [dict(row("ours", 256, 3.0, 60.0), time_x=9.9)]}  # a stale ratio from an earlier merge
    for name, rows in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"machine": {}, "rows": rows}))
    rows = report.ratios(report.merge([tmp_path / "a", tmp_path / "b"])[0])
    by = {(r["impl"], r["S"]): r for r in rows}
    assert by["ours", 256]["median_s"] == 3.0 and "time_x" not in by["ours", 256]  # from run b, floor from a
    assert by["ours", 256]["mem_x"] == 6.0  # memory runs are separate processes anyway
    assert by["ours", 512]["time_x"] == 2.0 and report._cell(by["ours", 256]).startswith("3000 (-)")


@pytest.mark.parametrize("fw, path", [("torch", "einsum"), ("jax", "shaw")])
def test_long_sequence_check_runs_and_reports(fw, path, capsys):
    """bench.long_sequence (the T = S = 16384 memory check) end to end at S = 64: one JSON line. At
    S = 64, below the banded path's crossover, torch's "auto" takes the einsum path."""
    import json

    pytest.importorskip(fw)
    from bench import long_sequence

    long_sequence.main(["--framework", fw, "-S", "64"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["framework"] == fw and out["S"] == 64 and out["path"] == path
    assert out["finite_grads"] is True and out["peak_rss_gib"] > 0


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_padded_bf16_and_layer_contestants(framework):
    """The key-padding pair computes masked attention (ours with the Shaw tables, the floor without),
    the bf16 pair runs in bfloat16, and one group with every new contestant runs through bench.case."""
    pytest.importorskip(framework)
    from bench import case

    x = _inputs()
    causal = True
    if framework == "torch":
        import torch

        from bench import peers_torch as P

        lib, xs = torch_lib(), {n: torch.from_numpy(a) for n, a in x.items()}
        mask = P.key_padding(B, T)
        as_np = lambda t: t.detach().numpy()  # noqa: E731
    else:
        import relattn_jax as lib

        from bench import peers_jax as P

        xs, mask = x, P.key_padding(B, T)
        as_np = np.asarray
    assert as_np(mask).shape == (B, 1, 1, T) and as_np(mask)[0].all() and not as_np(mask)[1, ..., -1].any()
    ours = lib.relative_attention(**xs, max_distance=K, is_causal=causal, mask=mask, implementation="einsum")
    assert_close(as_np(P.ours_padded(**xs, K=K, causal=causal)), as_np(ours))
    plain = lib.relative_attention(xs["q"], xs["k"], xs["v"], is_causal=causal, mask=mask)
    # jax.nn.dot_product_attention computes in float32 whatever the input dtype
    np.testing.assert_allclose(as_np(P.floor_padded(xs["q"], xs["k"], xs["v"], causal=causal)), as_np(plain),
                               atol=1e-6 if framework == "jax" else 1e-12)
    impls = ["ours", "floor", "ours_padded", "floor_padded", "ours_bf16", "floor_bf16", "layer", "layer_floor"]
    res = case.main(dict(framework=framework, case=dict(B=2, S=16, N=2, H=8, K=2, causal=causal, mode="fwdbwd"),
                         impls=impls, repeats=1))
    for n in impls:
        assert res[n].get("median_s", 0) > 0, (n, res[n])


def test_report_times_each_contestant_against_its_own_floor():
    from bench import report

    g = dict(framework="torch", S=256, causal=False, mode="fwdbwd", threads=1, run=0)
    rows = [dict(g, impl=n, median_s=t) for n, t in (("floor", 1.0), ("ours", 2.0), ("floor_padded", 4.0),
                                                     ("ours_padded", 6.0), ("layer_floor", 10.0), ("layer", 15.0))]
    rows.append(dict(g, impl="ours", median_s=3.0, threads=0))  # another thread setting: no floor there
    got = {(r["impl"], r["threads"]): r.get("time_x") for r in report.ratios(rows)}
    assert got[("ours", 1)] == 2.0 and got[("ours_padded", 1)] == 1.5 and got[("layer", 1)] == 1.5
    assert got[("floor_padded", 1)] == 1.0 and got[("ours", 0)] is None


def test_rows_under_competing_load_are_their_own_groups():
    from bench import report

    g = dict(framework="torch", S=256, causal=False, mode="fwdbwd", threads=2, run=0)
    rows = [dict(g, impl="floor", median_s=1.0), dict(g, impl="ours", median_s=1.5),
            dict(g, impl="floor", median_s=2.0, compete=2), dict(g, impl="ours", median_s=5.0, compete=2),
            dict(g, impl="ours", median_s=9.0, compete=1),  # no floor under that load: no ratio
            dict(g, impl="floor", median_s=1.0, compete=2, spin=1000), dict(g, impl="ours", median_s=2.0, compete=2,
                                                                             spin=1000)]
    got = {(r["impl"], r.get("compete", 0), r.get("spin")): r.get("time_x") for r in report.ratios(rows)}
    assert got[("ours", 0, None)] == 1.5 and got[("ours", 2, None)] == 2.5 and got[("ours", 1, None)] is None
    assert got[("ours", 2, 1000)] == 2.0
    md = report.markdown(rows, dict(platform="p", cpus=2, load_avg=(0, 0, 0)))
    assert "2 competing process(es)\n" in md and "2 competing process(es), GOMP_SPINCOUNT=1000\n" in md


def test_spin_setting_reaches_the_timed_process(monkeypatch):
    from bench import run

    seen = {}

    def fake_run(cmd, env, **kw):
        seen["spin"] = env.get("GOMP_SPINCOUNT")
        return type("R", (), {"returncode": 0, "stdout": '{"floor": {"median_s": 1.0}}', "stderr": ""})()

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(run.subprocess, "run", fake_run)
    assert run.run_case(dict(impls=["floor"]), 10, 1000) == {"floor": {"median_s": 1.0}}
    assert seen["spin"] == "1000"
    run.run_case(dict(impls=["floor"]), 10)
    assert seen["spin"] is None


def test_tail_covers_compute_the_same_triangle(capsys):
    torch = pytest.importorskip("torch")
    from bench import tails

    cover = tails.covers(64, K=4, B=1, N=2, H=8, pieces=(8, 24))
    (o, lse), = cover["causal"]()
    for m in (8, 24):
        got = cover[f"pieces_{m}"]()
        assert len(got) == -(-60 // m)
        torch.testing.assert_close(torch.cat([p[0] for p in got], 2), o)
        torch.testing.assert_close(torch.cat([p[1] for p in got], 2), lse)
    tails.main(["--sizes", "40", "--repeats", "1", "--threads", "1"])
    assert "L=40 fwd+bwd threads=1: full" in capsys.readouterr().out


def test_competitors_run_during_the_block_and_are_gone_after_it():
    import os

    from bench.compete import competitors

    with competitors(1):
        children = [p for p in os.listdir("/proc") if p.isdigit() and _parent(p) == os.getpid()]
        assert len(children) == 1
        busy = _cpu_ticks(children[0])
        import time

        time.sleep(0.6)
        assert _cpu_ticks(children[0]) > busy  # it is spinning
    assert not os.path.exists(f"/proc/{children[0]}") or _state(children[0]) == "Z"


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def _cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
