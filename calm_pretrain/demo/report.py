"""What the main job reports: the metrics it reads back, the training plot, the results table and the
summary printed at the end (also summary.txt)."""
from __future__ import annotations

import math
from pathlib import Path

from calm_pretrain.demo.pipeline import MODELS
from data_pipeline.files import read_jsonl


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a model stage's metrics.jsonl (which its training stage must have written)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (the training stage wrote none)")
    return read_jsonl(path)


def plot_training(run: Path, out: Path) -> Path:
    """One PNG: the training loss of each model (and the autoencoder's batch accuracy) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    titles = {"ae": "autoencoder: loss (CE·K + β·KL)", "calm": "CALM: energy loss", "transformer": "Transformer: CE"}
    for ax, name in zip(axes, MODELS):
        rows = read_metrics(run / name)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="C0")
        ax.set_title(titles[name])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if name == "ae":
            acc = ax.twinx()
            acc.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], color="C1")
            acc.set_ylabel("batch accuracy", color="C1")
            acc.set_ylim(0, 1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def results_table(calm: dict, tr: dict, flops: dict) -> str:
    """CALM and the Transformer side by side: training compute, BrierLM, Brier-1..4 (± standard error)
    and CALM's energy skill, the score that shows whether it uses its context before BrierLM moves."""
    def pm(s: dict, key: str) -> str:
        se = s[key + "_se"]  # enough decimals for two significant digits of the standard error
        d = 4 if not 0 < se < 1e-4 else min(7, 1 - math.floor(math.log10(se)))
        return f"{s[key]:+.{d}f} ± {se:.{d}f}"
    head = ["model", "train TFLOP", "BrierLM", *(f"Brier-{n}" for n in range(1, 5)), "energy skill"]
    rows = [[name, f"{flops[key] / 1e12:.1f}" if flops.get(key) else "?", f"{s['brierlm']:.2f}",
             *(pm(s, f"brier_{n}") for n in range(1, 5)), pm(s, "energy_skill") if "energy_skill" in s else "n/a"]
            for name, key, s in (("CALM", "calm", calm), ("Transformer", "transformer", tr))]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows])


def format_summary(rows: list[dict]) -> str:
    width = max(len(r["stage"]) for r in rows + [{"stage": "total"}])
    lines = [f"{'stage':<{width}}  {'time':>8}  key metric", "-" * (width + 100)]
    for r in rows:
        lines.append(f"{r['stage']:<{width}}  {r.get('seconds', 0):>7.1f}s  {r.get('metric', '')}")
    lines.append("-" * (width + 100))
    lines.append(f"{'total':<{width}}  {sum(r.get('seconds', 0) for r in rows):>7.1f}s  "
                 f"(stages run now and, for reused ones, when they ran)")
    for r in rows:
        if r.get("table"):
            lines += ["", f"held-out results {_compute_note(r.get('train_flops') or {})} (± one standard error):",
                      r["table"]]
    return "\n".join(lines)


def _compute_note(flops: dict) -> str:
    """Says "at the same training compute" only when it is (within 10%)."""
    calm, tr = flops.get("calm"), flops.get("transformer")
    if not (calm and tr):
        return "(training compute unknown)"
    if abs(calm / tr - 1) <= 0.1:
        return "at the same training compute"
    return f"(training compute differs: CALM {calm / tr:.2g}× the Transformer's)"
