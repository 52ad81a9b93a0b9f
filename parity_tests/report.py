"""Parity report: run the shared-weights harness over every configuration family.

    python -m parity_tests.report [--per-family 3] [--out runs/parity_report.json] [--no-compile]

Draws ``--per-family`` random configurations per family and dtype (bf16: fewer,
outputs only), half built in PyTorch and half in JAX, moves each through the
weight file into the other framework and records the largest error per quantity.
Prints a markdown table and writes every number to JSON. Exits 1 if any row is
out of tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict

import numpy as np

FAMILIES = ["mha-self", "mha-cross", "mha-T=1", "mha-fully-masked", "raa-ids", "raa-dense"]
QUANTITIES = ["output", "grad_inputs", "grad_params", "oracle"]


def _setup_jax():
    import jax  # float64 must be on before any JAX array exists

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")


def draw(rng: np.random.Generator, family: str, dtype: str, source: str):
    """A random configuration of ``family`` (the family fields are forced)."""
    from .harness import Config, normalize

    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    T, S = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    kw = dict(
        kind="mha", B=int(rng.integers(1, 3)), T=T, S=S, N=int(rng.integers(1, 4)), H=int(rng.integers(1, 5)),
        E=int(rng.integers(1, 9)), cross=False, max_distance=int(rng.integers(0, 8)),
        tables=pick(["shared", "per_head"]), relative=pick(["both", "keys", "values", "neither"]),
        mask=pick(["none", "padding", "causal", "both"]), empty_row=False, bias=bool(rng.integers(2)),
        dtype=dtype, source=source, seed=int(rng.integers(2**16)),
    )
    if family == "mha-cross":
        kw.update(cross=True, S=max(S, T))
    elif family == "mha-T=1":
        kw.update(T=1, cross=bool(rng.integers(2)))
    elif family == "mha-fully-masked":
        if rng.integers(2):
            kw.update(mask=pick(["padding", "both"]), empty_row=True)
        else:
            kw.update(cross=True, mask=pick(["causal", "both"]), T=max(T, S) + 1, S=min(T, S))
    elif family.startswith("raa"):
        kw.update(kind="raa", relation=family.split("-")[1], empty_row=bool(rng.integers(2)))
    cfg = normalize(Config(**kw))
    assert cfg.family == family, (family, cfg)
    return cfg


def run_all(per_family: int, seed: int = 0) -> list[dict]:
    from .harness import compare

    rng = np.random.default_rng(seed)
    records = []
    for family in FAMILIES:
        for dtype, n in (("float64", per_family), ("float32", per_family), ("bfloat16", max(1, per_family // 2))):
            for i in range(n):
                cfg = draw(rng, family, dtype, source=("torch", "jax")[i % 2])
                start = time.perf_counter()
                results = compare(cfg)
                records.append({
                    "family": family, "dtype": dtype, "config": asdict(cfg),
                    "seconds": round(time.perf_counter() - start, 3),
                    "results": [{**asdict(r), "ok": r.ok} for r in results],
                })
                print(f"  {family:18s} {dtype:9s} {i + 1}/{n}", file=sys.stderr, flush=True)
    return records


def summarize(records: list[dict]) -> list[dict]:
    """One row per (family, dtype): the largest error per quantity, the worst error/tol."""
    rows = []
    for family in FAMILIES:
        for dtype in ("float64", "float32", "bfloat16"):
            group = [r for r in records if r["family"] == family and r["dtype"] == dtype]
            if not group:
                continue
            row = {"family": family, "dtype": dtype, "configs": len(group)}
            results = [x for r in group for x in r["results"]]
            for q in QUANTITIES:
                errs = [x["error"] for x in results if x["quantity"] == q]
                row[q] = max(errs) if errs else None
            row["worst_ratio"] = max(x["error"] / x["tol"] for x in results)
            row["ok"] = all(x["ok"] for x in results)
            rows.append(row)
    return rows


def extra_checks(compile_torch: bool) -> dict:
    """jax.jit vs eager and torch.compile vs eager on one small float64 module."""
    import torch
    from flax import nnx

    from .harness import Config, build, inputs

    cfg = Config(mask="both", cross=True, T=3, S=4)
    arrays, kw = inputs(cfg)
    b, m = build("jax", cfg, seed=0)
    x = [b.jnp.asarray(arrays[n]) for n in ("query", "key", "value")]
    mask = b.jnp.asarray(kw["mask"])
    eager = m(*x, mask=mask, is_causal=True)
    jitted = nnx.jit(lambda m, q, k, v, mask: m(q, k, v, mask=mask, is_causal=True))(m, *x, mask)
    out = {"jax_jit_vs_eager": float(np.abs(np.asarray(eager) - np.asarray(jitted)).max())}
    if compile_torch:
        b, m = build("torch", cfg, seed=0)
        xt = [torch.from_numpy(arrays[n]) for n in ("query", "key", "value")]
        with torch.no_grad():
            e = m(*xt, mask=torch.from_numpy(kw["mask"]), is_causal=True)
            c = torch.compile(m, fullgraph=True)(*xt, mask=torch.from_numpy(kw["mask"]), is_causal=True)
        out["torch_compile_vs_eager"] = float((e - c).abs().max())
    return out


def markdown(rows: list[dict]) -> str:
    from .harness import TOLERANCE

    def fmt(x):
        return "-" if x is None else f"{x:.1e}"

    lines = [
        "| family | dtype | configs | output | grad inputs | grad params | vs oracle | tol (unit scale) | worst err/tol | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["family"], r["dtype"], str(r["configs"])] + [fmt(r[q]) for q in QUANTITIES]
        cells += [f"{TOLERANCE[r['dtype']]:.0e}", f"{r['worst_ratio']:.3f}", "yes" if r["ok"] else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    import flax
    import jax
    import torch

    return {"platform": platform.platform(), "processor": _cpu_model(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "jax": jax.__version__, "flax": flax.__version__}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-family", type=int, default=3, help="configs per family and dtype (bf16: half)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/parity_report.json", help="where to write the JSON report")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile check (slow on CPU)")
    args = parser.parse_args(argv)
    _setup_jax()
    start = time.perf_counter()
    records = run_all(args.per_family, args.seed)
    rows = summarize(records)
    checks = extra_checks(not args.no_compile)
    seconds = time.perf_counter() - start
    print(markdown(rows))
    print("\n" + "  ".join(f"{k}: max abs diff {v:.1e}" for k, v in checks.items()))
    print(f"{len(records)} configurations in {seconds:.0f} s on {machine()['processor']} ({os.cpu_count()} cpus)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report = {"machine": machine(), "seconds": round(seconds, 1), "rows": rows, "checks": checks,
              "configs": records, "args": vars(args)}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
