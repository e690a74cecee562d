#!/usr/bin/env bash
# A sweep on this machine through the sweep tooling, without Slurm: plan, train every point (PARALLEL at
# a time, one process and one thread each; a finished point is skipped, a cut-off one resumes), score
# each on every held-out block, collect, fit (BrierLM and energy skill against training FLOPs), plot,
# and the markdown table (tools/study/report.py).
#   bash tools/study/run_sweep_locally.sh SWEEP.yaml OUT_DIR
#   POINTS="0 3" bash tools/study/run_sweep_locally.sh SWEEP.yaml OUT_DIR   # only these points (then collect etc.)
set -euo pipefail
cd "$(dirname "$0")/../.."
SWEEP=$1
OUT=$2
PARALLEL=${PARALLEL:-2}
EVAL_BLOCKS=${EVAL_BLOCKS:-1000}
export OMP_NUM_THREADS=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
calm-sweep plan "$SWEEP" --out "$OUT/plan" --force
mkdir -p "$OUT/logs"
configs=()
for c in "$OUT"/plan/configs/*.yaml; do
  i=$((10#$(basename "$c" .yaml)))
  [[ -z ${POINTS:-} || " $POINTS " == *" $i "* ]] && configs+=("$c")
done
printf '%s\n' "${configs[@]}" | xargs -P "$PARALLEL" -I{} bash -c \
  'calm-pretrain train --config "$1" > "'"$OUT"'/logs/train_$(basename "$1" .yaml).log" 2>&1 && echo "trained $1" || echo "FAILED $1"' _ {}
calm-sweep evaluate "$OUT/plan" --max-blocks "$EVAL_BLOCKS" --force
calm-sweep collect "$OUT/plan" --out "$OUT/results.csv"
calm-sweep fit "$OUT/results.csv" --out "$OUT/fit_brierlm.json"
calm-sweep fit "$OUT/results.csv" --metric energy_skill --out "$OUT/fit_energy_skill.json"
calm-sweep plot "$OUT/results.csv" --fit "$OUT/fit_energy_skill.json" --out "$OUT/plots"
python3 tools/study/report.py "$OUT/results.csv" --fit "$OUT/fit_energy_skill.json" > "$OUT/table.md"
cat "$OUT/table.md"
