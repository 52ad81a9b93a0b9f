"""Tables and plots from the rows of ``bench.run``: ratios to the floor pair by pair."""

from __future__ import annotations

import json
from pathlib import Path


COLORS = {"ours": "C0", "ours_compile": "C1", "floor": "C2", "naive_shaw": "C3", "hf_relative_key": "C4",
          "flex": "C5", "ours_dense": "C6", "seed1": "C7"}
# The floor each contestant is timed against, in the same process; the others take "floor".
FLOORS = {"ours_padded": "floor_padded", "ours_bf16": "floor_bf16", "layer": "layer_floor"}
FLOOR_NAMES = {"floor", *FLOORS.values()}


def _group(r):
    """The process a row was timed in: framework, S, causal, mode, intra-op threads (0: the default)
    the number of competing busy processes (``bench.run --compete``) and GOMP_SPINCOUNT (``--spin``; -1: as
    inherited)."""
    return r["framework"], r["S"], r["causal"], r["mode"], r.get("threads", 0), r.get("compete", 0), r.get("spin", -1)


def merge(dirs):
    """Rows of several runs; a later run's row replaces an earlier one for the same case."""
    rows, machine = {}, None
    for i, d in enumerate(dirs):
        data = json.loads((Path(d) / "results.json").read_text())
        machine = data["machine"]
        for r in data["rows"]:
            rows[(r["impl"], *_group(r))] = {**r, "run": i}
    return list(rows.values()), machine


def ratios(rows):
    """Add time_x / mem_x: each contestant over the floor of the same group (one process).

    After ``merge``, a row and the floor row of its group may come from different runs: then no
    time ratio is given (the cell shows "(-)"), since the two were not timed side by side. Peak
    memory is measured in a process of its own anyway, so its ratio is given across runs.
    """
    floors = {(r["impl"], *_group(r)): r for r in rows if r["impl"] in FLOOR_NAMES}
    for r in rows:
        r.pop("time_x", None), r.pop("mem_x", None)  # a merged run's results.json carries old ones
        own = r["impl"] if r["impl"] in FLOOR_NAMES else FLOORS.get(r["impl"], "floor")  # a floor is its own
        f = floors.get((own, *_group(r)))
        if f and "median_s" in r and "median_s" in f and r.get("run") == f.get("run"):
            r["time_x"] = r["median_s"] / f["median_s"]
        if f and r.get("peak_mib") and f.get("peak_mib"):
            r["mem_x"] = r["peak_mib"] / f["peak_mib"]
    return rows


def markdown(rows, machine) -> str:
    rows = ratios(rows)
    lines = [f"Machine: {machine['platform']}, {machine['cpus']} CPUs, load average at the end {machine['load_avg']}.",
             "Cells: median time in ms (x the floor in the same process: `floor`, or for `ours_padded`, "
             "`ours_bf16` and `layer` their own floor); peak MiB (x the floor's) where measured.", ""]
    groups = sorted({_table(r) for r in rows})
    for fw, mode, causal, threads, compete, spin in groups:
        sub = [r for r in rows if _table(r) == (fw, mode, causal, threads, compete, spin)]
        impls = list(dict.fromkeys(r["impl"] for r in sub))
        sizes = sorted({r["S"] for r in sub})
        lines += [f"### {fw}, {'forward + backward' if mode == 'fwdbwd' else 'forward'}, "
                  f"{'causal' if causal else 'non-causal'}, {f'{threads} thread(s)' if threads else 'default threads'}"
                  + (f", {compete} competing process(es)" if compete else "")
                  + ("" if spin < 0 else f", GOMP_SPINCOUNT={spin}"),
                  "", "| S | " + " | ".join(impls) + " |",
                  "|---" * (len(impls) + 1) + "|"]
        for S in sizes:
            cells = []
            for n in impls:
                r = next((x for x in sub if x["S"] == S and x["impl"] == n), None)
                cells.append(_cell(r))
            lines.append(f"| {S} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _table(r):
    return r["framework"], r["mode"], r["causal"], r.get("threads", 0), r.get("compete", 0), r.get("spin", -1)


def _cell(r):
    if r is None:
        return "-"
    if "median_s" not in r:
        err = r.get("error", "?")
        err = "killed: out of memory" if err.startswith("exit -9") else err
        return "n/a: " + err.replace("|", "/")[:60]
    s = f"{r['median_s'] * 1e3:.0f} ({r['time_x']:.2f}x)" if "time_x" in r else f"{r['median_s'] * 1e3:.0f} (-)"
    if r.get("peak_mib") is not None:
        s += f"; {r['peak_mib']:.0f} MiB" + (f" ({r['mem_x']:.2f}x)" if "mem_x" in r else "")
    elif r.get("memory_error", "").startswith("exit -9"):
        s += "; memory run killed: out of memory"
    return s


def plot(rows, path: Path, fw: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    one = min((r.get("threads", 0) for r in rows if r["framework"] == fw), default=0)  # a thread setting per plot
    rows = [r for r in rows if r.get("threads", 0) == one and not r.get("compete", 0) and r.get("spin", -1) < 0]
    sub = [r for r in rows if r["framework"] == fw and r["mode"] == "fwdbwd" and not r["causal"]]
    sub = sub or [r for r in rows if r["framework"] == fw and not r["causal"]]
    for n in dict.fromkeys(r["impl"] for r in sub):
        pts = sorted(((r["S"], r) for r in sub if r["impl"] == n), key=lambda p: p[0])
        t = [(S, r["median_s"]) for S, r in pts if "median_s" in r]
        m = [(S, r["peak_mib"]) for S, r in pts if r.get("peak_mib")]
        style = dict(marker="o", lw=2.5 if n in ("ours", "floor") else 1.2, color=COLORS.get(n, "gray"))
        if t:
            axes[0].plot(*zip(*t), label=n, **style)
        if m:
            axes[1].plot(*zip(*m), label=n, **style)
    mode = sub[0]["mode"] if sub else "fwdbwd"
    for ax, what in zip(axes, ("median time [s]", "peak RSS increase [MiB]")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("S = T")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{fw}: {'forward + backward' if mode == 'fwdbwd' else 'forward'}, non-causal, B=2 N=8 H=64 k=16")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(out: Path, rows, machine):
    rows = ratios(rows)
    (out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (out / "results.md").write_text(markdown(rows, machine))
    for fw in sorted({r["framework"] for r in rows}):
        plot(rows, out / f"bench_{fw}.png", fw)


if __name__ == "__main__":  # re-render or merge: python -m bench.report OUT [RUN_DIR ...]
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    write(out, *merge(sys.argv[2:] or [out]))
