#!/usr/bin/env bash
# The first thing to run on a machine with one CUDA GPU (about 5-10 minutes):
#   bash tools/gpu_check.sh [OUT_DIR (default bench_out/gpu)]
# 1. the `gpu`-marked tests (tests/test_gpu.py: bf16 against float64, flash against the math kernel,
#    the trainer's bf16 path; tests/test_latents_on_the_fly.py: the frozen AE encoding in the step on the
#    device), which the CPU suite skips;
# 2. the step benchmark (tools/bench_trainer.py) for CALM-M and Transformer-S in bf16 with flash
#    attention: tokens/s, MFU against the measured bf16 matmul peak, peak memory. JSON in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out/gpu}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs one')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
export WANDB_MODE=offline
python -m pytest -q -m gpu tests/test_gpu.py tests/test_latents_on_the_fly.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
for spec in "configs/calm/calm_m.yaml" "configs/transformer/transformer_s.yaml"; do
  python tools/bench_trainer.py --config "$spec" train.precision=bf16 train.micro_batch_size=2 \
    --steps 10 --warmup 3 --sdpa flash --out "$OUT" > "$OUT/$(basename "$spec" .yaml).log"
done
python - "$OUT" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("trainer_*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem[8:]:<16} {r['device_name']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%} "
          f"({r['peak_source']}), peak memory {r['peak_memory_gb']:.1f} GB, step {r['step_time_s']:.3f} s")
PY
