#!/usr/bin/env bash
# The CALM learning study end to end on CPU (docs/learning_study.md): the study's extra autoencoders,
# then both rounds through the sweep tooling (tools/study/run_sweep_locally.sh: plan, train two points
# at a time, score on every held-out block, collect, fit, plot, table).
#   bash tools/study/run_learning_study.sh     # needs runs/demo_full (calm-pretrain demo --run-dir runs/demo_full)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tools/study/prepare_autoencoders.sh runs/demo_full runs/study
bash tools/study/run_sweep_locally.sh configs/sweeps/learning.yaml runs/study
bash tools/study/run_sweep_locally.sh configs/sweeps/learning_round2.yaml runs/study/round2
