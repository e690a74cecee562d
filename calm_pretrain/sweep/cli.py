"""Scaling-law sweeps: plan a grid of runs, submit it as Slurm job arrays, collect, fit and plot.

    tools/sweep.py plan configs/sweeps/scaling.yaml --out plans/scaling     # configs, plan.json, submit.sh
    bash plans/scaling/submit.sh                                            # AE → export → encode → train
    tools/sweep.py collect plans/scaling --out results/scaling.csv          # + .parquet, .steps.parquet
    tools/sweep.py fit results/scaling.csv --out results/fit.json
    tools/sweep.py plot results/scaling.csv --fit results/fit.json --out results/plots

A sweep YAML (``configs/sweeps/*.yaml``) extends the ``base`` / ``grid`` / ``overrides`` format of
``configs/sweeps/heads.yaml`` (which stays a valid sweep):

  base          a run config (CALM points; any arch works)
  grid          {dotted key | "size": [values]}: the cartesian product gives the points
  sizes         {size name: {dotted key: value}}: what a "size" grid value sets
  overrides     {dotted key: value} for every point (applied before the size and the grid values)
  baselines     optional: {base, grid, overrides} of Transformer baselines (sizes from `sizes`)
  autoencoders  optional: {K: {config, overrides, release}}: the frozen AE of every K; a missing
                `release` directory adds the stages that make it (AE training, export, encode)
  data          tokens (lm-layout token shards: latents and baselines; "{k}" is replaced by K,
                1 for the baseline), ae_tokens (the AE's
                training shards, "{k}" is replaced by K), eval (held-out token shards for
                BrierLM), latents (latent shards per K, default <runs>/latents-k{k}),
                sample_tokens (tokens per sample: seq_chunks = sample_tokens / K, or sample_tokens
                for the baseline)
  launch        {nodes, gpus_per_node}: the world size the planned token and FLOPs budgets assume
  runs          root of the run directories (default runs/sweeps/<sweep file name>)

FLOPs come from :mod:`calm_pretrain.flops` at the run's context (data.seq_chunks): training FLOPs per
token including the frozen AE's encoder forward per chunk (how the paper's table counts the AE for
CALM), inference FLOPs per token including the AE decoder; the AE's own training is listed with its
stage, not added to the points (the published AE is shared by every CALM size).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calm_pretrain.config import ConfigError
from calm_pretrain.sweep.collect import collect, read_tables, write_tables
from calm_pretrain.sweep.errors import SweepError
from calm_pretrain.sweep.evaluate import evaluate_plan, export_autoencoder
from calm_pretrain.sweep.fit import FIT_FORMS, fit
from calm_pretrain.sweep.plan import make_plan
from calm_pretrain.sweep.plot import plot
from data_pipeline.files import atomic_write_json


def _fmt_flops(x: float) -> str:
    return f"{x:.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("plan", help="resolve a sweep YAML into a plan directory (configs, plan.json, submit.sh)")
    s.add_argument("sweep")
    s.add_argument("--out", required=True, help="plan directory")
    s.add_argument("--force", action="store_true", help="replace an existing plan there")
    s = sub.add_parser("collect", help="every run's metrics.jsonl into one table")
    s.add_argument("plan_dir")
    s.add_argument("--out", required=True, help="results.csv or results.parquet (both written, + .steps.parquet)")
    s = sub.add_parser("fit", help="fit BrierLM against training FLOPs per K")
    s.add_argument("results", help="the table from collect (.csv or .parquet)")
    s.add_argument("--out", required=True, help="fit.json")
    s.add_argument("--form", choices=sorted(FIT_FORMS), default="loglinear")
    s.add_argument("--metric", default="brierlm", help="the score to fit: brierlm, energy_skill, brier_1, ...")
    s = sub.add_parser("plot", help="PNG figures: BrierLM vs training FLOPs, loss curves (and heads.png for a "
                                    "sweep over model.head.type)")
    s.add_argument("results")
    s.add_argument("--fit", help="fit.json (draws the fitted lines)")
    s.add_argument("--out", required=True, help="output directory")
    s = sub.add_parser("evaluate", help="final BrierLM of every point (the plan's eval stage)")
    s.add_argument("plan_dir")
    s.add_argument("--force", action="store_true", help="score points already scored again")
    s.add_argument("--max-blocks", type=int, help="held-out blocks to score (default: each point's eval.max_blocks)")
    s = sub.add_parser("export-ae", help="AE training runs → release directories for calm-data encode")
    s.add_argument("pairs", nargs="+", metavar="RUN_DIR RELEASE_DIR")
    args = p.parse_args(argv)
    try:
        if args.command == "plan":
            plan = make_plan(args.sweep, args.out, force=args.force)
            print(f"{plan['plan_dir']}: {len(plan['points'])} points, {len(plan['stages']['ae'])} autoencoder "
                  f"stages, {len(plan['stages']['encode'])} encode stages; submit with bash {plan['plan_dir']}/submit.sh")
            for q in plan["stages"]["ae"] + plan["points"]:
                print(f"  {q['kind']:<8} {q['name']:<32} {q['params'] / 1e6:9.2f}M params "
                      f"{_fmt_flops(q['training_flops_per_token'])} FLOPs/token {_fmt_flops(q['training_flops'])} FLOPs"
                      + (f"  after {', '.join(q['depends_on'])}" if q["depends_on"] else ""))
            for m in plan["missing_inputs"]:
                print(f"  warning: input {m} does not exist yet (make it before the jobs start)")
        elif args.command == "collect":
            runs, steps = collect(args.plan_dir)
            paths = write_tables(runs, steps, args.out)
            print(runs[["name", "group", "steps", "tokens", "training_flops", "final_loss", "final_brierlm",
                        "status"]].to_string(index=False))
            if runs["head"].dropna().nunique() > 1:  # a head comparison: the columns that compare heads
                print(runs[["head", "evals_per_vector", "final_brierlm", "final_brier_1", "final_energy_score",
                            "training_flops_per_token", "inference_flops_per_token", "train_seconds"]]
                      .to_string(index=False))
            print("wrote " + ", ".join(str(v) for v in paths.values()))
        elif args.command == "fit":
            runs, steps = read_tables(args.results)
            result = fit(runs, steps, args.form, args.metric)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(args.out), result)
            print(result["formula"])
            for g, e in result["groups"].items():
                if e["b"] is None:
                    print(f"  {g:<12} {e['note']} ({e['n']} points)")
                else:
                    r2 = "n/a" if e["r2"] is None else f"{e['r2']:.3f}"
                    zero = f" crosses 0 at {e['crosses_zero_at']:.3g} FLOPs" if e.get("crosses_zero_at") else ""
                    print(f"  {g:<12} a={e['a']:.4g} b={e['b']:.4g} r2={r2} n={e['n']} ({e['points_from']}){zero}")
        elif args.command == "plot":
            runs, steps = read_tables(args.results)
            fit_result = json.loads(Path(args.fit).read_text()) if args.fit else None
            for path in plot(runs, steps, fit_result, args.out):
                print(f"wrote {path}")
        elif args.command == "evaluate":
            print(f"scored {evaluate_plan(args.plan_dir, args.force, args.max_blocks)} points")
        elif args.command == "export-ae":
            if len(args.pairs) % 2:
                raise SweepError("export-ae takes pairs: RUN_DIR RELEASE_DIR [RUN_DIR RELEASE_DIR ...]")
            for run, rel in zip(args.pairs[::2], args.pairs[1::2]):
                print(f"exported {run} → {export_autoencoder(run, rel)}")
    except (SweepError, ConfigError) as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    return 0

