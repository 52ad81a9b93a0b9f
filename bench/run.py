"""Run the benchmark suite: ``python -m bench.run [--quick]``.

Writes ``runs/bench/results.json``, ``runs/bench/results.md`` and one PNG per framework
(time and peak memory against S, log-log). Every group (framework, S, causal, mode) runs in
a fresh process that times all contestants interleaved (see ``bench/case.py``), so ratios to
the floor are pair by pair within one process; peak memory is measured in a further fresh
process per contestant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.compete import competitors

SIZES = [256, 512, 1024, 2048, 4096, 8192]
IMPLS = {
    "torch": ["ours", "ours_compile", "floor", "naive_shaw", "hf_relative_key", "flex", "ours_dense", "seed1",
              "ours_padded", "floor_padded", "ours_bf16", "floor_bf16", "layer", "layer_floor"],
    "jax": ["ours", "floor", "naive_shaw", "hf_relative_key", "ours_dense", "seed1",
            "ours_padded", "floor_padded", "ours_bf16", "floor_bf16", "layer", "layer_floor"],
}
QUADRATIC = {"naive_shaw", "hf_relative_key"}  # hold several [B, N, T, S] tensors
DENSE = {"ours_dense", "seed1"}  # take [S, S, N, H] edge tensors


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="S in {256, 512}, memory for ours and the floor only")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--frameworks", nargs="+", default=["torch", "jax"], choices=["torch", "jax"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--causal", nargs="+", default=["false", "true"], choices=["false", "true"])
    p.add_argument("--impls", nargs="+", default=None, help="subset of contestants")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", choices=["all", "ours_floor", "none"], default=None)
    p.add_argument("--dense-max-s", type=int, default=512, help="largest S for the dense-edge contestants")
    p.add_argument("--quadratic-max-s", type=int, default=4096, help="largest S for gather/scatter and HF peers, forward")
    p.add_argument("--quadratic-max-s-fwdbwd", type=int, default=4096,
                   help="largest S for gather/scatter and HF peers, forward + backward")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                   help="intra-op thread settings, each a run of every group (0: the framework's default)")
    p.add_argument("--compete", type=int, nargs="+", default=[0],
                   help="competing busy processes during a group (bench/compete.py), each a run of every group")
    p.add_argument("--spin", type=int, nargs="+", default=[None],
                   help="GOMP_SPINCOUNT for the timed processes, each a run of every group (default: as inherited); "
                        "how long torch's OpenMP threads spin before they sleep, which decides what a competing "
                        "process costs")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per process")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("-B", type=int, default=2)
    p.add_argument("-N", type=int, default=8)
    p.add_argument("-H", type=int, default=64)
    p.add_argument("-K", type=int, default=16)
    a = p.parse_args(argv)
    a.sizes = a.sizes or ([256, 512] if a.quick else SIZES)
    a.memory = a.memory or ("ours_floor" if a.quick else "all")
    if a.quick:
        a.dense_max_s = min(a.dense_max_s, 256)
    return a


def contestants(args, fw, S, causal, mode):
    """(contestants to run, {contestant: why it is skipped}) for one group."""
    names = [n for n in IMPLS[fw] if args.impls is None or n in args.impls]
    out, skipped = [], {}
    gib = args.B * args.N * S * S * 4 / 2**30  # one float32 [B, N, T, S] tensor
    for n in names:
        if n in DENSE and causal:
            continue  # the seed-1 code has no mask: dense rows are non-causal only
        if n in DENSE and S > args.dense_max_s:
            edge_gib = S * S * args.N * args.H * 4 / 2**30
            skipped[n] = f"skipped: edges {edge_gib:.0f} GiB each"
            continue
        limit = args.quadratic_max_s if mode == "fwd" else args.quadratic_max_s_fwdbwd
        if n in QUADRATIC and S > limit:
            skipped[n] = f"skipped: several [B,N,T,S] of {gib:.0f} GiB"
            continue
        if n == "flex" and mode != "fwd":
            continue
        if n == "ours_compile" and args.quick:
            continue
        out.append(n)
    return out, skipped


def run_case(spec, timeout, spin=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if spin is not None:
        env["GOMP_SPINCOUNT"] = str(spin)
    cmd = [sys.executable, "-m", "bench.case", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {n: {"error": f"timeout after {timeout} s"} for n in spec["impls"]}
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or ["killed (SIGKILL: out of memory?)" if r.returncode == -9 else "?"])[-1][:200]
        return {n: {"error": f"exit {r.returncode}: {err}"} for n in spec["impls"]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    groups = [(spin, compete, threads, fw, S, causal, mode) for spin in args.spin for compete in args.compete
              for threads in args.threads for fw in args.frameworks for S in args.sizes
              for causal in (c == "true" for c in args.causal) for mode in args.modes]
    for spin, compete, threads, fw, S, causal, mode in groups:
        case = dict(B=args.B, S=S, N=args.N, H=args.H, K=args.K, causal=causal, mode=mode)
        names, skipped = contestants(args, fw, S, causal, mode)
        spec = dict(framework=fw, case=case, impls=names, repeats=args.repeats, threads=threads)
        # the dense pair runs in a process of its own: seed 1's multi-GiB temporaries slowed
        # the contestants timed after them in one process (jax S=512: ours 220 -> 869 ms)
        res = {}
        with competitors(compete):
            for part in ([n for n in names if n not in DENSE], [n for n in names if n in DENSE]):
                if part:
                    res.update(run_case(dict(spec, impls=part), args.timeout, spin))
        mem_names = {"all": names, "none": [], "ours_floor": ["ours", "floor"]}[args.memory]
        if (args.quick and S != max(args.sizes)) or (mode == "fwd" and "fwdbwd" in args.modes):
            mem_names = []  # memory: forward + backward rows only (and the largest S if --quick)
        for n in mem_names:
            m = run_case(dict(spec, impls=[n], repeats=1, memory=True), args.timeout, spin)[n]
            res[n]["peak_mib"] = m.get("peak_mib", None)
            if "error" in m and "error" not in res[n]:
                res[n]["memory_error"] = m["error"]
        for n, r in {**res, **{n: {"error": why} for n, why in skipped.items()}}.items():
            rows.append(dict(framework=fw, impl=n, threads=threads, compete=compete, **case, **r,
                             **({} if spin is None else {"spin": spin})))
        print(f"[{time.time() - t0:6.0f}s] {fw} threads={threads or 'default'} compete={compete} "
              + ("" if spin is None else f"GOMP_SPINCOUNT={spin} ") + f"S={S} causal={causal} {mode}: "
              + ", ".join(f"{n} {r['median_s'] * 1e3:.0f}ms" if "median_s" in r else f"{n} ERR"
                          for n, r in res.items()), flush=True)
        _save(out, args, rows)
    report.write(out, rows, _machine())
    print(f"wrote {out}/results.json, results.md and bench_*.png")


def _machine():
    import resource  # noqa: F401  (Linux only, like the memory method)

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_avg": os.getloadavg(),
            "env": {k: os.environ[k] for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")
                    if k in os.environ}}


def _save(out, args, rows):
    (out / "results.json").write_text(json.dumps({"args": vars(args), "machine": _machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
