"""Print every study point's held-out evaluations so far (step, energy skill ± se, Brier-1..4, token accuracy).
    python3 tools/study/progress.py [runs/study/points]"""
import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study/points")
for metrics in sorted(root.glob("*/metrics.jsonl")):
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "eval/brier_1" not in r:
            continue
        skill = (f"skill {r['eval/energy_skill']:+.4f} ± {r['eval/energy_skill_se']:.4f}"
                 if "eval/energy_skill" in r else " " * 23)
        brier = " ".join(f"{r[f'eval/brier_{n}']:+.4f}±{r[f'eval/brier_{n}_se']:.4f}" for n in range(1, 5))
        acc = f"acc {r['eval/token_accuracy']:.4f}" if "eval/token_accuracy" in r else ""
        print(f"{metrics.parent.name:<28} step {r['step']:>5}  {skill}  brier {brier}  {acc}")
