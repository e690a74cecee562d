"""The learning study's table (markdown) from `calm-sweep collect` and `calm-sweep fit` outputs.

    python3 tools/study/report.py runs/study/results.csv --fit runs/study/fit_energy_skill.json \
        --brier-fit runs/study/fit_brierlm.json > docs/learning_study_table.md
One row per point: training FLOPs, final held-out energy skill, Brier-1..4 and BrierLM (each ± one standard
error, clustered by eval block), decoded-token accuracy, and where the fitted energy-skill line (against
log10 FLOPs, over the run's evaluations) crosses zero.
"""
import argparse
import json
import math

import pandas as pd


def pm(row, key: str) -> str:
    v, se = row.get(f"final_{key}"), row.get(f"final_{key}_se")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:+.4f} ± {se:.4f}" if se is not None and not math.isnan(se) else f"{v:+.4f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--fit", help="fit.json of the energy skill")
    p.add_argument("--plan-dir", default="runs/study/plan")
    args = p.parse_args()
    runs = pd.read_csv(args.results)
    fit = json.loads(open(args.fit).read())["groups"] if args.fit else {}
    head = ["#", "variant", "K", "train FLOPs", "energy skill", "Brier-1", "Brier-2", "Brier-3", "Brier-4",
            "BrierLM", "token acc.", "skill slope / decade", "skill = 0 at FLOPs"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for i, (_, r) in enumerate(runs.iterrows()):
        row = r.to_dict()
        variant = row["variant"] if isinstance(row.get("variant"), str) else "Transformer (baseline)"
        g = fit.get(str(row["group"]), {})
        slope = f"{g['b']:+.4f}" if g.get("b") is not None else "n/a"
        zero = f"{g['crosses_zero_at']:.2g}" if g.get("crosses_zero_at") and g.get("b", 0) > 0 else "n/a"
        k = "" if pd.isna(row.get("k")) else int(row["k"])
        print(f"| {i} | {variant} | {k} | {row['training_flops']:.3g} | {pm(row, 'energy_skill')} | "
              + " | ".join(pm(row, f"brier_{n}") for n in range(1, 5))
              + f" | {row['final_brierlm']:.2f} | {pm(row, 'token_accuracy')} | {slope} | {zero} |")


if __name__ == "__main__":
    main()
