"""Metrics JSONL, the progress bar, the evaluation table and the plots (framework-free)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class MetricsLog:
    """Append-only JSONL of train metrics; on resume, rows after ``keep_until`` are dropped
    (they were written after the checkpoint the run resumes from), and so is a torn last
    line (a kill in the middle of a write)."""

    def __init__(self, path: Path, keep_until: int = 0):
        self.path = Path(path)
        rows = read_jsonl(self.path) if keep_until else []
        kept = [r for r in rows if r["step"] <= keep_until]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_jsonl(path) -> list[dict]:
    """The rows of a metrics file; a torn last line is dropped with a notice, a bad line elsewhere raises.

    Raises:
        RunError: a line other than the last is not a JSON object.
    """
    from .rundir import RunError, note

    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
            if not isinstance(rows[-1], dict) or "step" not in rows[-1]:
                raise ValueError("not a metrics row")
        except ValueError as e:
            if i < len(lines) - 1:
                raise RunError(f"{path} line {i + 1} is not a metrics row ({e}); it is not a torn last line, "
                               f"so the file was changed by something else") from e
            note(f"dropping the torn last line of {path} (written when the run was killed): {line[:80]!r}")
            rows = rows[:i]
    return rows


class _Quiet:
    def set_postfix(self, **kw):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def progress(cfg, start: int, framework: str):
    """A tqdm bar showing loss, accuracy and tokens/s (silent with --no-progress)."""
    if not cfg.progress:
        return _Quiet()
    from tqdm import tqdm

    desc = f"{framework} {cfg.task} {cfg.position} L={cfg.length}"
    return tqdm(total=cfg.steps, initial=start, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def format_table(rows_by_model: dict) -> str:
    """Markdown table: one row per model, token/sequence accuracy at each eval length."""
    models = list(rows_by_model)
    lengths = [r["length"] for r in rows_by_model[models[0]]]
    head = "| model | " + " | ".join(f"L={n} (T={r['T']})" for n, r in zip(lengths, rows_by_model[models[0]])) + " |"
    sep = "|---|" + "---|" * len(lengths)
    lines = [head, sep]
    for m in models:
        cells = [f"{100 * r['token_acc']:.1f}% / {100 * r['seq_acc']:.0f}%" for r in rows_by_model[m]]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\ncells: token accuracy / whole-sequence accuracy on the scored positions\n"


def write_eval(out: Path, cfg, rows: list[dict], *, framework: str) -> None:
    """eval.json, eval.md and curves.png of one run."""
    (out / "eval.json").write_text(json.dumps(rows, indent=1))
    table = format_table({f"{framework} {cfg.position}": rows})
    (out / "eval.md").write_text(table)
    print(table)
    plot_curves({cfg.position: read_jsonl(out / "metrics.jsonl")}, out / "curves.png", title=f"{framework} {cfg.task}")


def plot_curves(runs: dict, path, *, title: str = "", eval_rows: dict | None = None) -> None:
    """Loss and accuracy against step for each run (and accuracy against length if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3 if eval_rows else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.4), dpi=90)
    for name, rows in runs.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=name)
        axes[1].plot(steps, [r["acc"] for r in rows], label=name)
    axes[0].set(xlabel="step", ylabel="train loss", yscale="log", title=title)
    axes[1].set(xlabel="step", ylabel="train accuracy (scored tokens)", ylim=(0, 1.02))
    if eval_rows:
        for name, rows in eval_rows.items():
            axes[2].plot([r["length"] for r in rows], [r["token_acc"] for r in rows], "o-", label=name)
        axes[2].set(xlabel="eval length L", ylabel="eval token accuracy", xscale="log", ylim=(0, 1.02),
                    title="length generalisation")
        axes[2].set_xticks([r["length"] for r in next(iter(eval_rows.values()))])
        axes[2].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
