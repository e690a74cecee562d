"""Collecting: every point's metrics.jsonl (and the eval stage's sweep_eval.json) into a runs table and
a steps table, written as CSV and Parquet."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from calm_pretrain.sweep.errors import SweepError
from data_pipeline.files import read_jsonl

EVAL_FILE = "sweep_eval.json"
# the scores besides BrierLM that collect() reports per run (final_<name>), with their standard errors
FINAL_SCORES = tuple(f"{name}{se}" for name in ("brier_1", "brier_2", "brier_3", "brier_4", "energy_score",
                                                 "marginal_energy_score", "energy_skill", "token_accuracy")
                     for se in ("", "_se"))


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (none if it is missing; a line cut short by a kill is skipped)."""
    return read_jsonl(path)


def collect(plan_dir: str | os.PathLike):
    """(runs table: one row per training point, steps table: one row per logged record) as DataFrames.

    The final scores are the eval stage's (sweep_eval.json) or the last evaluation during training:
    BrierLM, Brier-1 and, for CALM, the held-out energy score. seconds_per_step is the mean logged
    step time, train_seconds = seconds_per_step × steps (the exact training-loop time when every step
    is logged, train.log_every = 1)."""
    import pandas as pd

    plan_dir = Path(plan_dir)
    try:
        plan = json.loads((plan_dir / "plan.json").read_text())
    except (OSError, ValueError) as e:
        raise SweepError(f"{plan_dir}: no readable plan.json ({e})") from None
    rows, steps = [], []
    for p in plan["points"]:
        recs = read_records(Path(p["run_dir"]) / "metrics.jsonl")
        last = recs[-1] if recs else {}
        evals = [r for r in recs if "eval/brierlm" in r]
        scored = Path(p["run_dir"]) / EVAL_FILE
        if scored.is_file():  # the eval stage: the newest checkpoint's score
            final = json.loads(scored.read_text())
            evals.append({"step": final["step"], "eval/brierlm": final.get("brierlm", math.nan),
                          **{f"eval/{k}": final[k] for k in FINAL_SCORES if k in final}})
        tokens_per_step = last.get("tokens", p["tokens_per_step"])
        step = int(last.get("step", 0))
        tokens = step * tokens_per_step
        times = [r["step_time"] for r in recs if "step_time" in r]
        per_step = sum(times) / len(times) if times else math.nan
        rows.append({
            "name": p["name"], "group": p["group"], "arch": p["arch"], "k": p["k"], "size": p["size"],
            "variant": p.get("variant"), "head": p.get("head"), "evals_per_vector": p.get("evals_per_vector"),
            "params": p["params"], "context": p["context"],
            "training_flops_per_token": p["training_flops_per_token"],
            "inference_flops_per_token": p["inference_flops_per_token"],
            "steps": step, "max_steps": p["max_steps"], "tokens": tokens,
            "training_flops": p["training_flops_per_token"] * tokens, "planned_training_flops": p["training_flops"],
            "final_loss": last.get("loss", math.nan),
            "final_brierlm": evals[-1]["eval/brierlm"] if evals else math.nan,
            "brierlm_step": evals[-1]["step"] if evals else None,
            **{f"final_{k}": evals[-1].get(f"eval/{k}", math.nan) if evals else math.nan for k in FINAL_SCORES},
            "seconds_per_step": per_step, "train_seconds": per_step * step,
            "status": "missing" if not recs else ("complete" if step >= p["max_steps"] else "partial"),
            "run_dir": p["run_dir"]})
        for r in recs:
            row = {"name": p["name"], "group": p["group"], "arch": p["arch"], "k": p["k"], "size": p["size"],
                   "step": int(r["step"]), "tokens": int(r["step"]) * r.get("tokens", tokens_per_step)}
            row["training_flops"] = p["training_flops_per_token"] * row["tokens"]
            for key in ("loss", "lr", "grad_norm", "ce", "kl", "accuracy", "tokens_per_s", "step_time"):
                if key in r:
                    row[key] = r[key]
            for key, v in r.items():
                if key.startswith("eval/"):
                    row[key.replace("/", "_")] = v
            steps.append(row)
    runs = pd.DataFrame(rows)
    runs["k"] = runs["k"].astype("Int64")
    steps_df = pd.DataFrame(steps)
    if len(steps_df):
        steps_df["k"] = steps_df["k"].astype("Int64")
    return runs, steps_df


def write_tables(runs, steps, out: str | os.PathLike) -> dict:
    """out = X.csv or X.parquet: writes X.csv and X.parquet (runs) and X.steps.parquet (per step)."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix in (".csv", ".parquet") else out
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = {"csv": base.with_suffix(".csv"), "parquet": base.with_suffix(".parquet"),
             "steps": base.parent / (base.name + ".steps.parquet")}
    runs.to_csv(paths["csv"], index=False)
    runs.to_parquet(paths["parquet"], index=False)
    steps.to_parquet(paths["steps"], index=False)
    return paths


def read_tables(results: str | os.PathLike):
    import pandas as pd

    results = Path(results)
    base = results.with_suffix("") if results.suffix in (".csv", ".parquet") else results
    runs = pd.read_parquet(results) if results.suffix == ".parquet" else pd.read_csv(results)
    steps_path = base.parent / (base.name + ".steps.parquet")
    steps = pd.read_parquet(steps_path) if steps_path.is_file() else pd.DataFrame()
    return runs, steps
