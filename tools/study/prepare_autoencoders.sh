#!/usr/bin/env bash
# The autoencoders of the CALM learning study (configs/sweeps/learning.yaml) beyond the main job's own
# (K=4, d=64): K=1 (d=16) and K=2 (d=32), with the same 16 latent dims per token, and two K=4 variants,
# a smaller latent (d=16) and a 10x KL weight (d=64, beta=1e-2). Each: token shards from the main job's
# corpus and tokenizer, `calm-pretrain train` with configs/demo/ae.yaml, `calm-pretrain export`,
# `calm-data encode`. Two at a time, one process and one thread each. Idempotent: a finished AE is skipped.
#   bash tools/study/prepare_autoencoders.sh [DEMO_RUN_DIR (default runs/demo_full)] [OUT (default runs/study)]
set -euo pipefail
cd "$(dirname "$0")/../.."
DEMO=${1:-runs/demo_full}
OUT=${2:-runs/study}
[[ -f $DEMO/encode.done.json ]] || { echo "run the main job first: calm-pretrain demo --run-dir $DEMO" >&2; exit 1; }
mkdir -p "$OUT/logs"
export OMP_NUM_THREADS=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

tokens() {  # NAME LAYOUT K SEQ_CHUNKS
  [[ -f $OUT/data/$1/manifest.json ]] && return
  calm-data tokenize "$DEMO/corpus/train.jsonl" -o "$OUT/data/$1" --tokenizer "$DEMO/tokenizer" --layout "$2" \
    --k "$3" --seq-chunks "$4" -j 0 --no-progress > "$OUT/logs/tokenize_$1.log" 2>&1
}

autoencoder() {  # NAME K LATENT_DIM LM_TOKENS [OVERRIDES...]
  local name=$1 k=$2 d=$3 lm=$4
  shift 4
  [[ -f $OUT/latents/$name/manifest.json ]] && { echo "$name: done before"; return; }
  tokens "ae_tokens_k$k" ae "$k" $((256 / k))
  calm-pretrain train --config configs/demo/ae.yaml model.k="$k" model.latent_dim="$d" data.seq_chunks=$((256 / k)) \
    "data.train=[$OUT/data/ae_tokens_k$k]" data.eval="$DEMO/data/heldout" train.output_dir="$OUT/ae/$name" \
    train.zero_stage=0 train.engine=torch name="study-ae-$name" "$@" > "$OUT/logs/ae_$name.log" 2>&1
  calm-pretrain export --checkpoint "$OUT/ae/$name" --out "$OUT/release/$name" --tokenizer "$DEMO/tokenizer" \
    > "$OUT/logs/export_$name.log" 2>&1
  calm-data encode "$lm" --ae "$OUT/release/$name" -o "$OUT/latents/$name" --no-progress > "$OUT/logs/encode_$name.log" 2>&1
  echo "$name: $(grep -o 'accuracy [0-9.]*, accuracy_noise_0.1 [0-9.]*' "$OUT/logs/ae_$name.log" | tail -1)"
}

tokens lm_tokens_k1 lm 1 256
tokens lm_tokens_k2 lm 2 128
( autoencoder k1-d16 1 16 "$OUT/data/lm_tokens_k1" ) &
( autoencoder k2-d32 2 32 "$OUT/data/lm_tokens_k2" ) &
wait
( autoencoder k4-d16 4 16 "$DEMO/data/lm_tokens" ) &
( autoencoder k4-d64-kl1e-2 4 64 "$DEMO/data/lm_tokens" model.kl_weight=0.01 ) &
wait
