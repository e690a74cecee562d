"""Plotting: BrierLM against training FLOPs with the fitted lines, loss curves, and the figures of a head
comparison (heads.png) and of a one-at-a-time study (study.png)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from calm_pretrain.models import spec_of
from calm_pretrain.sweep.fit import predict


def _baseline(arch: str) -> bool:
    """A baseline next to the sweep's subject (CALM, on an autoencoder's latents): the Transformer, drawn
    dashed, after the CALM groups, scored by its cross-entropy."""
    return not spec_of(arch).uses_autoencoder


def _group_arch(runs) -> dict:
    """{group: the arch of its runs}."""
    return dict(zip(runs["group"], runs["arch"]))


def _group_order(groups, arch_of: dict) -> list[str]:
    def key(g: str):
        return (1, 0) if _baseline(arch_of[g]) else (0, int(g.split("=")[1]) if "=" in g else 0)
    return sorted(set(groups), key=key)


def plot(runs, steps, fit_result: Optional[dict], out_dir: str | os.PathLike) -> list[Path]:
    """brierlm_vs_flops.png (final points, fitted lines, one colour per K, the Transformer dashed) and
    loss_curves.png (training loss against tokens: CALM's energy loss and the baseline's cross-entropy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arch_of = _group_arch(runs)
    groups = _group_order(runs["group"], arch_of)
    colours = {g: plt.get_cmap("tab10")(i) for i, g in enumerate(groups)}
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for g in groups:
        baseline, name = _baseline(arch_of[g]), spec_of(arch_of[g]).display_name
        style = "--" if baseline else "-"
        d = runs[(runs["group"] == g) & runs["final_brierlm"].notna() & (runs["training_flops"] > 0)]
        ax.scatter(d["training_flops"], d["final_brierlm"], color=colours[g], marker="s" if baseline else "o",
                   zorder=3, label=g if baseline else f"{name} {g}")
        for _, r in d.iterrows():
            if isinstance(r["size"], str):
                ax.annotate(r["size"], (r["training_flops"], r["final_brierlm"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        entry = (fit_result or {}).get("groups", {}).get(g)
        if entry and entry.get("b") is not None:
            lo, hi = entry["flops_range"]
            xs = [lo * (hi / lo) ** (i / 49) for i in range(50)]
            ax.plot(xs, [predict(entry, fit_result["form"], x) for x in xs], style, color=colours[g],
                    label=f"fit {g}: slope {entry['b']:.2f}" + (" (eval history)" if entry["points_from"] != "final" else ""))
            if entry["points_from"] != "final":
                ax.scatter([c for c, _ in entry["points"]], [v for _, v in entry["points"]], color=colours[g],
                           marker=".", alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (incl. AE encoder share)")
    ax.set_ylabel("BrierLM")
    ax.set_title("BrierLM vs training compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save_figure(fig, out_dir / "brierlm_vs_flops.png"))

    if steps is not None and len(steps) and "loss" in steps:
        archs = sorted(dict.fromkeys(steps["arch"]), key=_baseline)  # CALM's panel, then the baselines
        fig, axes = plt.subplots(1, max(1, len(archs)), figsize=(6.0 * max(1, len(archs)), 4.2), squeeze=False)
        sizes = list(dict.fromkeys(str(x) for x in runs["size"]))  # sweep order: small to large
        styles = [":", "--", "-.", "-"][-len(sizes):] if len(sizes) <= 4 else ["-"] * len(sizes)
        for ax, arch in zip(axes[0], archs):
            for name, d in steps[steps["arch"] == arch].groupby("name", sort=False):
                g = d["group"].iloc[0]
                style = styles[sizes.index(str(d["size"].iloc[0]))] if str(d["size"].iloc[0]) in sizes else "-"
                ax.plot(d["tokens"], d["loss"], style, color=colours.get(g, "k"), label=name, alpha=0.85)
            ax.set_xlabel("training tokens")
            heads = set(runs["head"].dropna()) if "head" in runs else set()
            ax.set_ylabel("cross-entropy" if _baseline(arch) else
                          "energy loss" if heads <= {"energy"} else "head loss (each head its own: not comparable)")
            name = spec_of(arch).display_name
            ax.set_title(f"{name} baseline" if _baseline(arch) else name)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
        written.append(_save_figure(fig, out_dir / "loss_curves.png"))
    if "head" in runs and runs["head"].dropna().nunique() > 1:
        written.append(plot_heads(runs, out_dir / "heads.png"))
    if "variant" in runs and runs["variant"].notna().any() and steps is not None and len(steps):
        written.append(plot_study(runs, steps, out_dir / "study.png"))
    return written


STUDY_PANELS = [("energy_skill", "energy skill (> 0: uses its context)")] + \
    [(f"brier_{n}", f"Brier-{n}") for n in range(1, 5)] + [("token_accuracy", "decoded-token accuracy, 1 sample")]


def plot_study(runs, steps, path: str | os.PathLike) -> Path:
    """A one-at-a-time study: each variant's held-out scores (± one standard error) against the training
    FLOPs spent, from the evaluations during training; a baseline's (the Transformer's) Brier-n dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    names = list(dict.fromkeys(runs["name"]))
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    for ax, (metric, title) in zip(axes.flat, STUDY_PANELS):
        col = f"eval_{metric}"
        if col not in steps:
            continue
        for name, d in steps[steps[col].notna()].groupby("name", sort=False):
            baseline = _baseline(d["arch"].iloc[0])
            se = d[f"{col}_se"] if f"{col}_se" in d else None
            label = (spec_of(d["arch"].iloc[0]).display_name if baseline
                     else str(runs.loc[runs["name"] == name, "variant"].iloc[0]))
            ax.errorbar(d["training_flops"], d[col], yerr=se, fmt="--s" if baseline else "-o", ms=3, capsize=2,
                        color="k" if baseline else colours[name], label=label, alpha=0.85)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=6, ncol=2)
    return _save_figure(fig, path, dpi=110)


HEAD_PANELS = [  # (column, title, log scale): a training loss is not comparable across heads, so none here
    ("final_brierlm", "BrierLM (higher is better)", False),
    ("final_brier_1", "Brier-1 (higher is better)", False),
    ("final_energy_score", "held-out energy score (lower is better)", False),
    ("evals_per_vector", "network evaluations per vector", True),
    ("training_flops_per_token", "training FLOPs / token", False),
    ("inference_flops_per_token", "generation FLOPs / token", True),
    ("train_seconds", "training seconds", False),
    ("params", "parameters", False),
]


def _short(v: float) -> str:
    return f"{v / 1e6:.3g}M" if abs(v) >= 1e5 else f"{v:.4g}"


def plot_heads(runs, path: str | os.PathLike) -> Path:
    """One bar per head type in each of HEAD_PANELS (a sweep over model.head.type, one run per head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = runs[runs["head"].notna()]
    names = d["head"].tolist()
    colours = [plt.get_cmap("tab10")(i) for i in range(len(names))]
    fig, axes = plt.subplots(2, 4, figsize=(12, 5.6))
    for ax, (column, title, log) in zip(axes.flat, HEAD_PANELS):
        values = [float(v) for v in d[column]] if column in d else [math.nan] * len(names)
        ax.bar(names, [0.0 if math.isnan(v) else v for v in values], color=colours)
        for i, v in enumerate(values):
            if not math.isnan(v):
                ax.annotate(_short(v), (i, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=7,
                            xytext=(0, 2 if v >= 0 else -2), textcoords="offset points")
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return _save_figure(fig, path, dpi=100)


def _save_figure(fig, path: str | os.PathLike, dpi: int = 150) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
