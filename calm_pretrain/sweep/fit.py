"""Fitting: a score against training FLOPs per group (K, the Transformer, or a study's variants)."""
from __future__ import annotations

import math
from typing import Any

from calm_pretrain.sweep.errors import SweepError

FIT_FORMS = {
    # BrierLM is a bounded score (0–100) that grows roughly linearly in log-compute over the range a
    # sweep covers: least squares of BrierLM on log10(C).
    "loglinear": "brierlm = a + b * log10(training_flops)",
    # A power law in compute, fitted as a line in log-log space (positive BrierLM only).
    "power": "brierlm = 10**a * training_flops**b  (least squares of log10 brierlm on log10 C)",
}


def _least_squares(x: list[float], y: list[float]) -> dict:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    sxy = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y))
    b = sxy / sxx
    a = my - b * mx
    ss_res = sum((yi - a - b * xi) ** 2 for xi, yi in zip(x, y))
    ss_tot = sum((yi - my) ** 2 for yi in y)
    return {"a": a, "b": b, "r2": (1.0 - ss_res / ss_tot) if ss_tot > 0 else None, "n": n}


def fit(runs, steps=None, form: str = "loglinear", metric: str = "brierlm") -> dict:
    """Per group (K=1, K=2, ..., Transformer, or a study's variants): `metric` against training FLOPs.

    `metric` is brierlm or any score the evaluation logs (energy_skill, brier_1, ...). The points are
    each run's final (training FLOPs, metric): a group's runs of different sizes. A group with fewer
    than two distinct FLOPs values (one size only) is fitted on its runs' evaluation history instead
    (the metric at every evaluated step against the FLOPs spent up to that step), and says so in
    ``points_from``. With the loglinear form, ``crosses_zero_at`` is the FLOPs where the fitted line
    reaches 0 (the budget at which a score below zero is projected to turn positive)."""
    if form not in FIT_FORMS:
        raise SweepError(f"unknown fit form {form!r}; known: {sorted(FIT_FORMS)}")
    final, history = f"final_{metric}", f"eval_{metric}"
    if final not in runs:
        raise SweepError(f"no column {final} in the results: is {metric!r} a score the evaluation logs?")
    out = {"form": form, "metric": metric, "formula": FIT_FORMS[form].replace("brierlm", metric), "groups": {}}
    for group, g in runs.groupby("group", sort=False):
        g = g[g[final].notna() & (g["training_flops"] > 0)]
        pts = [(float(c), float(v)) for c, v in zip(g["training_flops"], g[final])]
        source = "final"
        if len({c for c, _ in pts}) < 2 and steps is not None and len(steps) and history in steps:
            h = steps[(steps["group"] == group) & steps[history].notna() & (steps["training_flops"] > 0)]
            pts = [(float(c), float(v)) for c, v in zip(h["training_flops"], h[history])]
            source = "eval history"
        if form == "power":
            pts = [(c, v) for c, v in pts if v > 0]
        entry: dict[str, Any] = {"points_from": source, "points": [[c, v] for c, v in pts]}
        if len({c for c, _ in pts}) < 2:
            entry.update(a=None, b=None, r2=None, n=len(pts), note="fewer than two distinct FLOPs values: no fit")
        else:
            xs = [math.log10(c) for c, _ in pts]
            ys = [v if form == "loglinear" else math.log10(v) for _, v in pts]
            entry.update(_least_squares(xs, ys))
            entry["flops_range"] = [min(c for c, _ in pts), max(c for c, _ in pts)]
            if form == "loglinear" and entry["b"]:
                entry["crosses_zero_at"] = 10 ** (-entry["a"] / entry["b"])
        out["groups"][str(group)] = entry
    return out


def predict(entry: dict, form: str, flops: float) -> float:
    x = math.log10(flops)
    return entry["a"] + entry["b"] * x if form == "loglinear" else 10 ** (entry["a"] + entry["b"] * x)
