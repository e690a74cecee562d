"""The CPU recipe's figure and table (configs/pipeline/cpu_k1.yaml) from its run directory:

    python3 tools/study/recipe_report.py runs/cpu_k1 --png docs/study/cpu_k1.png --json docs/study/cpu_k1_eval.json

The curve: the trainer's periodic evaluations (train.eval_every, eval.max_blocks blocks: wide error bars)
of Brier-1..4 and the energy skill against training FLOPs, for CALM and the Transformer; the final
row: the main job's evaluate stage on every held-out block. Prints the markdown table.
"""
import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curve(run: Path, name: str, flops_total: float) -> list[dict]:
    rows = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in rows)
    return [dict(r, flops=flops_total * r["step"] / last) for r in rows if "eval/brier_1" in r]


def pm(s: dict, key: str) -> str:
    se = s[key + "_se"]
    d = 4 if se >= 1e-4 else 5
    return f"{s[key]:+.{d}f} ± {se:.{d}f} ({s[key] / se:+.1f} s.e.)" if se else f"{s[key]:+.{d}f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--png")
    p.add_argument("--json")
    args = p.parse_args()
    run = Path(args.run)
    stages = {s["stage"]: s for s in json.loads((run / "summary.json").read_text())["stages"]}
    final = json.loads((run / "eval.json").read_text())
    flops = {m: stages[m]["train_flops"] for m in ("calm", "transformer")}
    seconds = {m: stages[m]["seconds"] for m in stages}
    print("| model | training | train FLOPs | stage time | BrierLM | Brier-1 | Brier-2 | Brier-3 | Brier-4 | energy skill |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in ("calm", "transformer"):
        s, r = final[m], stages[m]
        skill = pm(s, "energy_skill") if "energy_skill" in s else "n/a"
        print(f"| {m} | {r['steps']} steps | {flops[m]:.3g} | {seconds[m] / 60:.0f} min | {s['brierlm']:.2f} | "
              + " | ".join(pm(s, f"brier_{n}") for n in range(1, 5)) + f" | {skill} |")
    total = sum(seconds.values())
    print(f"\nWhole pipeline: {total / 60:.0f} min ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}); "
          f"held-out: {final['calm']['num_blocks']} blocks of {final['calm']['block_tokens']} tokens.")
    if args.json:
        Path(args.json).write_text(json.dumps({"eval": final, "train_flops": flops, "stage_seconds": seconds},
                                              indent=1))
    if args.png:
        fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
        keys = [f"brier_{n}" for n in range(1, 5)] + ["energy_skill"]
        for ax, key in zip(axes, keys):
            for m, colour in (("calm", "tab:blue"), ("transformer", "tab:orange")):
                pts = [r for r in curve(run, m, flops[m]) if f"eval/{key}" in r]
                if not pts:
                    continue
                ax.errorbar([r["flops"] for r in pts], [r[f"eval/{key}"] for r in pts],
                            yerr=[2 * r[f"eval/{key}_se"] for r in pts], fmt="o-", ms=3, color=colour,
                            label=f"{m} (periodic eval, ± 2 s.e.)")
                s = final[m]
                if key in s:
                    ax.errorbar([flops[m]], [s[key]], yerr=[2 * s[key + "_se"]], fmt="s", ms=7, color=colour,
                                mfc="white", label=f"{m}, all {s['num_blocks']} blocks")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("training FLOPs")
            ax.set_title(key.replace("_", "-").replace("energy-skill", "energy skill"))
        axes[-1].legend(fontsize=7)
        fig.suptitle("CPU recipe (configs/pipeline/cpu_k1.yaml): K = 1 CALM vs Transformer, held-out scores")
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
