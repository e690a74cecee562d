#!/usr/bin/env bash
# The CALM learning study, end to end on CPU (docs/learning_study.md): the study's autoencoders, then
# configs/sweeps/learning.yaml through the sweep tooling: plan, train every point (PARALLEL at a time,
# one process and one thread each; a finished point is skipped, a cut-off one resumes), evaluate,
# collect, fit (BrierLM and energy skill against training FLOPs), plot.
#   bash tools/study/run_learning_study.sh            # needs runs/demo_full (calm-pretrain demo --run-dir runs/demo_full)
#   POINTS="0 3" bash tools/study/run_learning_study.sh   # only these points of the plan (then collect etc.)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=runs/study
PARALLEL=${PARALLEL:-2}
export OMP_NUM_THREADS=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
bash tools/study/prepare_autoencoders.sh runs/demo_full "$OUT"
calm-sweep plan configs/sweeps/learning.yaml --out "$OUT/plan" --force
mkdir -p "$OUT/logs"
configs=()
for c in "$OUT"/plan/configs/*.yaml; do
  i=$((10#$(basename "$c" .yaml)))
  [[ -z ${POINTS:-} || " $POINTS " == *" $i "* ]] && configs+=("$c")
done
printf '%s\n' "${configs[@]}" | xargs -P "$PARALLEL" -I{} bash -c \
  'calm-pretrain train --config "$1" > "'"$OUT"'/logs/train_$(basename "$1" .yaml).log" 2>&1 && echo "trained $1" || echo "FAILED $1"' _ {}
calm-sweep evaluate "$OUT/plan" --max-blocks 1000 --force   # every held-out block: 811 of 256 tokens
calm-sweep collect "$OUT/plan" --out "$OUT/results.csv"
calm-sweep fit "$OUT/results.csv" --out "$OUT/fit_brierlm.json"
calm-sweep fit "$OUT/results.csv" --metric energy_skill --out "$OUT/fit_energy_skill.json"
calm-sweep plot "$OUT/results.csv" --fit "$OUT/fit_energy_skill.json" --out "$OUT/plots"
