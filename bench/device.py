"""The accelerator check: ``python -m bench.device [--out DIR] [--budget-s S] [--smoke]``.

One command for a machine with a GPU. Each framework runs in a process of its own (JAX is told
not to preallocate, so the two never share device memory), and each process:

1. checks parity of the fused kernel against the einsum path on the device, forward and
   backward (output, dq, dk, dv, d rel_k, d rel_v), in float32 and bfloat16, against a float32
   einsum reference (a float64 one for the float32 kernel);
2. times forward and forward+backward at B=2, N=16, H in {64, 128}, K in {16, 64},
   S in {1024, ..., 16384} (bfloat16, self-attention, keys and values), for
   - ``fused``: our kernel (``implementation="fused"``),
   - ``floor``: torch SDPA on its best backend / ``jax.nn.dot_product_attention(implementation="cudnn")``,
   - ``flex`` (torch only): FlexAttention with the key term as a table lookup in ``score_mod``
     (it cannot add the value term),
   - ``einsum``: our einsum path (skipped where its [B, N, T, S] tensors cannot fit);
   and records each contestant's peak device memory (torch: ``max_memory_allocated`` above the
   inputs; JAX: the compiled program's argument + output + temporary bytes).

The grid runs most important first (K=16 before K=64, every S before the next H) and stops
timing when ``--budget-s`` is spent, recording what it skipped, so the whole command ends within
the budget (default 420 s, under 8 minutes with start-up). ``--smoke`` runs a tiny grid on the
CPU through the interpreters (``TRITON_INTERPRET=1``, ``RELATTN_PALLAS_INTERPRET=1``) to check
the script itself; its times mean nothing.

Writes ``DIR/device.json`` and ``DIR/device.md`` (default ``runs/device``) and prints the
markdown. Needs only torch (with triton), jax, flax and numpy: the GPU machine's preinstalled
stack, with this tree on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

FULL = dict(B=2, N=16, H=[64, 128], K=[16, 64], S=[1024, 2048, 4096, 8192, 16384], repeats=5,
            parity=dict(B=2, N=4, T=300, S=333, H=64, K=16))
SMOKE = dict(B=1, N=2, H=[32], K=[4], S=[48], repeats=1,
             parity=dict(B=1, N=2, T=20, S=37, H=32, K=4))
EINSUM_MAX_BYTES = 24 << 30  # skip the einsum path where one float32 [B, N, S, S] tensor exceeds this / 4


def _grid(g):
    """(H, K, S) in order of importance: the target's K=16 first, then K=64."""
    return [(H, K, S) for K in g["K"] for H in g["H"] for S in g["S"]]


# --------------------------------------------------------------------------------------------
# torch


def _torch_part(g, budget_s, smoke):
    import torch
    import torch.nn.functional as F

    from relattn_torch import relative_attention
    from relattn_torch.fused import fused_attention, unavailable

    dev = "cpu" if smoke else "cuda"
    torch.manual_seed(0)
    why = unavailable(torch.empty(1, device=dev))
    out = {"framework": "torch", "torch": torch.__version__, "device": _torch_device_name(dev)}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if why:
        out["error"] = f"fused kernel unavailable: {why}"
        return out

    def make(B, T, S, N, H, K, dtype, grad=False):
        x = [torch.randn(B, L, N, H, device=dev, dtype=dtype) for L in (T, S, S)]
        tables = [0.5 * torch.randn(2 * K + 1, H, device=dev, dtype=dtype) for _ in range(2)]
        return [t.requires_grad_(grad) for t in x + tables]

    def run(impl, args, K, grad_out=None):
        q, k, v, tk, tv = args
        z = relative_attention(q, k, v, tk, tv, max_distance=K, implementation=impl)
        if grad_out is None:
            return z, None
        grads = torch.autograd.grad(z, (q, k, v, tk, tv), grad_out)
        return z, grads

    low = torch.float16 if smoke else torch.bfloat16  # Triton's interpreter has no bf16 arithmetic
    p = g["parity"]
    out["parity"] = []
    for dtype, ref_dtype in ((torch.float32, torch.float64), (low, torch.float32)):
        args = make(p["B"], p["T"], p["S"], p["N"], p["H"], p["K"], dtype, grad=True)
        ref_args = [a.detach().to(ref_dtype).requires_grad_() for a in args]
        dz = torch.randn_like(ref_args[0])
        z, grads = run("fused", args, p["K"], dz.to(dtype))
        z_ref, grads_ref = run("einsum", ref_args, p["K"], dz)
        names = ["out", "dq", "dk", "dv", "d_rel_k", "d_rel_v"]
        errs = {n: _rel_err(a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy())
                for n, a, b in zip(names, (z,) + grads, (z_ref,) + grads_ref)}
        out["parity"].append({"dtype": str(dtype).replace("torch.", ""), "reference": str(ref_dtype).replace("torch.", ""),
                              "max_rel_err": errs})

    flex = _flex_maker(torch) if not smoke else None
    out["timing"] = []
    start = time.perf_counter()
    for H, K, S in _grid(g):
        row = {"H": H, "K": K, "S": S}
        out["timing"].append(row)
        if time.perf_counter() - start > budget_s:
            row["skipped"] = "time budget"
            continue
        B, N = g["B"], g["N"]
        contestants = {
            "fused": lambda a: relative_attention(*a, max_distance=K, implementation="fused"),
            "floor": lambda a: F.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in a[:3])).transpose(1, 2),
            "einsum": lambda a: relative_attention(*a, max_distance=K, implementation="einsum"),
        }
        if flex is not None:
            contestants["flex"] = lambda a: flex(*a, K)
        for name, fn in contestants.items():
            if name == "einsum" and B * N * S * S * 4 > EINSUM_MAX_BYTES / 4:
                row[name] = {"skipped": "[B, N, S, S] too large"}
                continue
            row[name] = _torch_measure(torch, fn, lambda: make(B, S, S, N, H, K, low, grad=True),
                                       g["repeats"], dev)
    return out


def _torch_device_name(dev):
    import torch

    return torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"


def _flex_maker(torch):
    """FlexAttention with the Shaw key term q_i . a^K[r_ij] as a lookup into q @ a^K^T [B, N, T, R]."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, tk, tv, K):
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, L, H]
        scale = q.shape[-1] ** -0.5
        qa = torch.einsum("BNTH,RH->BNTR", qh, tk) * (1.0 / scale)  # added before flex scales

        def score_mod(score, b, h, i, j):
            r = torch.clamp(j - i, -K, K) + K
            return score + qa[b, h, i, r] * scale

        return compiled(qh, kh, vh, score_mod=score_mod).transpose(1, 2)

    return run


def _torch_measure(torch, fn, make_args, repeats, dev):
    """Median forward and forward+backward times (ms) and the peak memory above the inputs (MiB)."""
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    try:
        args = make_args()
        sync()
        base = torch.cuda.memory_allocated() if dev == "cuda" else 0
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        z = fn(args)
        z.backward(torch.ones_like(z))  # compile / warm up both directions
        sync()
        fwd, both = [], []
        for _ in range(repeats):
            for a in args:
                a.grad = None
            t = time.perf_counter()
            with torch.no_grad():
                fn(args)
            sync()
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            z = fn(args)
            z.backward(torch.ones_like(z))
            sync()
            both.append(time.perf_counter() - t)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev == "cuda" else None
        return {"fwd_ms": 1e3 * statistics.median(fwd), "fwdbwd_ms": 1e3 * statistics.median(both), "peak_mib": peak}
    except Exception as e:  # noqa: BLE001 (an out-of-memory or unsupported contestant is a result)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    finally:
        if dev == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# jax


def _jax_part(g, budget_s, smoke):
    import jax
    import jax.numpy as jnp

    from relattn_jax import relative_attention
    from relattn_jax.fused import unavailable

    if smoke:
        jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")  # the reference in true float32
    out = {"framework": "jax", "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
           "backend": jax.default_backend()}
    why = unavailable(jnp.zeros(1))
    if why:
        out["error"] = f"fused kernel unavailable: {why}"
        return out
    key = iter(jax.random.split(jax.random.PRNGKey(0), 10_000))

    def make(B, T, S, N, H, K, dtype):
        x = [jax.random.normal(next(key), (B, L, N, H), dtype) for L in (T, S, S)]
        return x + [0.5 * jax.random.normal(next(key), (2 * K + 1, H), dtype) for _ in range(2)]

    def loss_grad(impl, K):
        def f(q, k, v, tk, tv, dz):
            z = relative_attention(q, k, v, tk, tv, max_distance=K, implementation=impl)
            return jnp.sum(z.astype(jnp.float32) * dz.astype(jnp.float32)), z

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))

    p = g["parity"]
    out["parity"] = []
    ref_pairs = ((jnp.float32, jnp.float64 if smoke else jnp.float32), (jnp.bfloat16, jnp.float32))
    for dtype, ref_dtype in ref_pairs:
        args = make(p["B"], p["T"], p["S"], p["N"], p["H"], p["K"], dtype)
        dz = jax.random.normal(next(key), args[0].shape, jnp.float32)
        grads, z = loss_grad("fused", p["K"])(*args, dz)
        ref = [a.astype(ref_dtype) for a in args]
        grads_ref, z_ref = loss_grad("einsum", p["K"])(*ref, dz.astype(ref_dtype))
        names = ["out", "dq", "dk", "dv", "d_rel_k", "d_rel_v"]
        errs = {n: _rel_err(a, b) for n, a, b in zip(names, (z,) + grads, (z_ref,) + grads_ref)}
        out["parity"].append({"dtype": jnp.dtype(dtype).name, "reference": jnp.dtype(ref_dtype).name,
                              "max_rel_err": errs})

    out["timing"] = []
    start = time.perf_counter()
    for H, K, S in _grid(g):
        row = {"H": H, "K": K, "S": S}
        out["timing"].append(row)
        if time.perf_counter() - start > budget_s:
            row["skipped"] = "time budget"
            continue
        B, N = g["B"], g["N"]
        args = make(B, S, S, N, H, K, jnp.bfloat16)
        contestants = {
            "fused": lambda q, k, v, tk, tv: relative_attention(q, k, v, tk, tv, max_distance=K, implementation="fused"),
            "floor": lambda q, k, v, tk, tv: jax.nn.dot_product_attention(
                q, k, v, implementation=None if smoke else "cudnn"),
            "einsum": lambda q, k, v, tk, tv: relative_attention(q, k, v, tk, tv, max_distance=K, implementation="einsum"),
        }
        for name, fn in contestants.items():
            if name == "einsum" and B * N * S * S * 4 > EINSUM_MAX_BYTES / 4:
                row[name] = {"skipped": "[B, N, S, S] too large"}
                continue
            row[name] = _jax_measure(jax, jnp, fn, args, g["repeats"])
    return out


def _jax_measure(jax, jnp, fn, args, repeats):
    """Median forward and forward+backward times (ms) and the compiled fwd+bwd program's bytes (MiB)."""
    try:
        fwd = jax.jit(fn)
        both = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4)))
        jax.block_until_ready(fwd(*args))
        jax.block_until_ready(both(*args))
        tf, tb = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fwd(*args))
            tf.append(time.perf_counter() - t)
            t = time.perf_counter()
            jax.block_until_ready(both(*args))
            tb.append(time.perf_counter() - t)
        mem = both.lower(*args).compile().memory_analysis()
        peak = None
        if mem is not None:
            inputs = sum(a.size * a.dtype.itemsize for a in args)
            total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            peak = (total - inputs) / 2**20
        return {"fwd_ms": 1e3 * statistics.median(tf), "fwdbwd_ms": 1e3 * statistics.median(tb), "peak_mib": peak}
    except Exception as e:  # noqa: BLE001 (an out-of-memory or unsupported contestant is a result)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}


# --------------------------------------------------------------------------------------------
# driver


def _rel_err(got, ref) -> float:
    """max |got - ref| / max(1, max |ref|), both as float64 NumPy arrays."""
    import numpy as np

    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


def markdown(results) -> str:
    """The JSON results as markdown tables: parity, then time and memory per framework."""
    lines = [f"# Device check ({results['date']})", ""]
    for part in results["parts"]:
        fw = part.get("framework", "?")
        lines.append(f"## {fw}: {part.get('device', '?')}")
        lines.append("")
        if "error" in part:
            lines += [f"Not run: {part['error']}", ""]
            continue
        lines += ["| dtype | vs | " + " | ".join(part["parity"][0]["max_rel_err"]) + " |",
                  "|---|---|" + "---|" * len(part["parity"][0]["max_rel_err"])]
        for p in part["parity"]:
            lines.append(f"| {p['dtype']} | {p['reference']} | "
                         + " | ".join(f"{e:.2e}" for e in p["max_rel_err"].values()) + " |")
        lines += ["", "| H | K | S | contestant | fwd ms | fwd+bwd ms | fwd+bwd / floor | peak MiB | peak / floor |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in part["timing"]:
            if "skipped" in row:
                lines.append(f"| {row['H']} | {row['K']} | {row['S']} | all | skipped: {row['skipped']} | | | | |")
                continue
            floor = row.get("floor", {})
            for name in ("fused", "floor", "flex", "einsum"):
                if name not in row:
                    continue
                r = row[name]
                if "fwd_ms" not in r:
                    lines.append(f"| {row['H']} | {row['K']} | {row['S']} | {name} | "
                                 f"{r.get('error') or r.get('skipped')} | | | | |")
                    continue
                ratio = r["fwdbwd_ms"] / floor["fwdbwd_ms"] if "fwdbwd_ms" in floor else float("nan")
                peak, fpeak = r.get("peak_mib"), floor.get("peak_mib")
                mem = f"{peak:.0f}" if peak is not None else "n/a"
                mratio = f"{peak / fpeak:.2f}x" if peak is not None and fpeak else "n/a"
                lines.append(f"| {row['H']} | {row['K']} | {row['S']} | {name} | {r['fwd_ms']:.2f} | "
                             f"{r['fwdbwd_ms']:.2f} | {ratio:.2f}x | {mem} | {mratio} |")
        lines.append("")
    return "\n".join(lines)


def _part(framework, budget_s, smoke):
    g = SMOKE if smoke else FULL
    fn = _torch_part if framework == "torch" else _jax_part
    return fn(g, budget_s, smoke)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/device")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole check (both frameworks)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU grid through the interpreters")
    ap.add_argument("--frameworks", nargs="+", default=["torch", "jax"], choices=["torch", "jax"])
    ap.add_argument("--part", choices=["torch", "jax"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.part:  # a child process: one framework, JSON on stdout's last line
        print(json.dumps(_part(a.part, a.budget_s, a.smoke)))
        return 0
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if a.smoke:
        env.update(TRITON_INTERPRET="1", RELATTN_PALLAS_INTERPRET="1", JAX_PLATFORMS="cpu")
    parts, start = [], time.perf_counter()
    for i, fw in enumerate(a.frameworks):
        left = a.budget_s - (time.perf_counter() - start)
        share = max(10.0, left / (len(a.frameworks) - i))
        cmd = [sys.executable, "-m", "bench.device", "--part", fw, "--budget-s", str(0.75 * share)]
        cmd += ["--smoke"] if a.smoke else []
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=share + 120)
            last = proc.stdout.strip().splitlines()[-1:] or ["{}"]
            part = json.loads(last[0]) if proc.returncode == 0 else {
                "framework": fw, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}
        except subprocess.TimeoutExpired:
            part = {"framework": fw, "error": f"timed out after {share + 120:.0f} s"}
        parts.append(part)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
               "smoke": a.smoke, "parts": parts}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (out / "device.md").write_text(md)
    print(md)
    return 0 if all("error" not in p for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
