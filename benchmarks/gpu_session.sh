#!/usr/bin/env bash
# One short GPU session (an H100/H200 lent for ~10 minutes): everything the 2-core CPU cannot afford,
# in one go, with the project's own CLIs. Writes into $OUT (default .cache/gpu-session):
#   default/        the artifact exported from the long run (assets/default format)
#   default-mor/    routers-only overlay trained on that run (assets/default-mor format)
#   runs/<name>/    log.txt + metrics.jsonl + config.json of every run (checkpoints stay behind)
#   eval-*.json/md  held-out evaluation (python -m model.evaluation --device cuda) of every run
#   timeline.txt    what ran when
# Runs, all on the embedded SmolLM2-135M teacher, --train lora (shared block frozen, so the default
# stays a small artifact), bf16 autocast, sequence length 512:
#   main:   2x14 MIDDLE-CYCLE, ASVD r128, uptrain for MAIN_SECONDS, then exits for EXITS_SECONDS,
#           then expert-choice routers (routers only, and routers trained with the LoRA: "mor-block")
#   frontier (concurrently, equal budgets of FRONTIER_TOKENS): schemes x ranks x init, plus the
#           exits co-trained (uptrain --with-exits) vs post-trained (uptrain, then exits) ablation.
# Every training command is the resumable CLI of model/training/train.py; --max-seconds fits each schedule to
# the time left. Budgets are environment variables so the same script runs a smoke test on a CPU:
#   MAIN_SECONDS=30 EXITS_SECONDS=15 FRONTIER_TOKENS=4k ... benchmarks/gpu_session.sh
set -u
PY=${PY:-python3}
OUT=${OUT:-.cache/gpu-session}
RUNS=${RUNS:-.cache/gpu-runs}
MAIN_SECONDS=${MAIN_SECONDS:-250}
EXITS_SECONDS=${EXITS_SECONDS:-60}
ROUTER_SECONDS=${ROUTER_SECONDS:-45}
FRONTIER_TOKENS=${FRONTIER_TOKENS:-2M}
FRONTIER_EXIT_TOKENS=${FRONTIER_EXIT_TOKENS:-500k}
FRONTIER_SECONDS=${FRONTIER_SECONDS:-240}
MAIN_BATCH=${MAIN_BATCH:-16}
FRONTIER_BATCH=${FRONTIER_BATCH:-8}
EVAL_TOKENS=${EVAL_TOKENS:-8192}
MOR_EVAL_TOKENS=${MOR_EVAL_TOKENS:-192}
PRECISION=${PRECISION:-bf16}
PROBE=${PROBE:-10}
FRONTIER_MAX=${FRONTIER_MAX:-5}
mkdir -p "$OUT" "$RUNS"
T0=$(date +%s)
mark() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a "$OUT/timeline.txt"; }

COMMON=(--train lora --seq-len 512 --mixed-precision "$PRECISION" --seed 0 --save-every 100 --val-rows 16
        --budget-probe "$PROBE")
CONV=(--base smollm2-135m --sharing middle_cycle --init average --lora-init asvd)
MAIN_OPT=(--batch-size "$MAIN_BATCH" --grad-accum 2 --lr 5e-4 --warmup 30 --eval-every 100)
FR_OPT=(--batch-size "$FRONTIER_BATCH" --grad-accum 2 --lr 5e-4 --warmup 20 --eval-every 0
        --tokens "$FRONTIER_TOKENS" --max-seconds "$FRONTIER_SECONDS")

train() {  # train <name> <threads> args...: one run, its output in $RUNS/<name>.out
    local name=$1 threads=$2; shift 2
    mark "start $name"
    OMP_NUM_THREADS=$threads $PY -m model.training "$@" --threads "$threads" --out "$RUNS/$name" \
        > "$RUNS/$name.out" 2>&1 && mark "done $name" || mark "FAILED $name (rc $?)"
}

collect() {  # logs and provenance of every run (the checkpoints are too big to keep)
  for dir in "$RUNS"/*/; do
    name=$(basename "$dir"); mkdir -p "$OUT/runs/$name"
    cp "$dir"/log.txt "$dir"/metrics.jsonl "$OUT/runs/$name/" 2>/dev/null
    cp "$dir"/checkpoint/config.json "$OUT/runs/$name/" 2>/dev/null
  done
  cp "$RUNS"/*.out "$RUNS"/*.err "$OUT/runs/" 2>/dev/null
}
if [ "${1:-}" = collect ]; then collect; exit 0; fi

# 0. the teacher from the GGUF and the ASVD covariances, once (every run below reuses the caches)
mark "prep"
$PY - <<'EOF' || mark "FAILED prep"
import torch
from model.conversion.asvd import cached_covariances
from model.io.checkpoint import load_model
teacher, _ = load_model("smollm2-135m")
cached_covariances(teacher, "smollm2-135m", num_sequences=64, seq_len=512, seed=1234)
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
mark "prep done"

# 1. the long run of the default's configuration, its exits, the artifact, and routers on it ...
ROUTERS=(--routing expert --capacity 1,0.5 --aux-coeff 0.1 "${COMMON[@]}" --batch-size "$MAIN_BATCH" --grad-accum 1
         --lr 1e-4 --halting-lr 3e-3 --warmup 10 --eval-every 0 --tokens 20M --max-seconds "$ROUTER_SECONDS")
( train main 4 uptrain "${CONV[@]}" --loops 2 --lora-rank 128 "${COMMON[@]}" "${MAIN_OPT[@]}" \
      --tokens 60M --max-seconds "$MAIN_SECONDS"
  # routers trained *with* the block (LoRA + norms + routers): evaluated here, too big to ship
  ( train mor-block 2 routers --from "$RUNS/main" "${ROUTERS[@]}" --train lora
    [ -f "$RUNS/mor-block/checkpoint/config.json" ] && mark "mor eval" && \
    $PY benchmarks/mor_eval.py --model "$RUNS/mor-block/checkpoint" --tokens "$MOR_EVAL_TOKENS" --threads 8 \
        --sets heldout-fiction,heldout-chat --json "$OUT/mor-block.json" > "$RUNS/mor-block-eval.out" 2>&1 \
        && mark "mor eval done" || mark "FAILED mor eval" ) &
  train main-ee 4 exits --from "$RUNS/main" "${COMMON[@]}" --batch-size "$MAIN_BATCH" --grad-accum 1 --lr 2e-4 \
      --halting-lr 3e-3 --warmup 10 --eval-every 0 --tokens 20M --max-seconds "$EXITS_SECONDS"
  ( $PY -m model.io.default export --from "$RUNS/main-ee" --out "$OUT/default" > "$RUNS/export.out" 2>&1 \
      && mark "exported default" || mark "FAILED export" ) &
  EXPORT_PID=$!
  # routers only, on the default: the shippable overlay (assets/default-mor)
  train mor-e 2 routers --from "$RUNS/main-ee" "${ROUTERS[@]}" --train routers
  wait "$EXPORT_PID"
  [ -f "$OUT/default/config.json" ] && $PY -m model.io.default export-overlay --from "$RUNS/mor-e" --base "$OUT/default" \
      --out "$OUT/default-mor" > "$RUNS/overlay.out" 2>&1 && mark "exported default-mor" || mark "FAILED overlay"
  mark "eval main"
  SPECS=()
  for name in main main-ee mor-e mor-block; do
    [ -f "$RUNS/$name/checkpoint/config.json" ] && SPECS+=("$name=$RUNS/$name")
  done
  $PY -m model.evaluation --model teacher --compare "${SPECS[@]}" --device auto --sweep-tokens 0 \
      --max-tokens "$EVAL_TOKENS" --batch-size 8 --threads 4 --json "$OUT/eval-main.json" \
      > "$OUT/eval-main.md" 2> "$RUNS/eval-main.err" && mark "eval main done" || mark "FAILED eval main"
) &
MAIN_PID=$!

# 2. ... and, on the same GPU at the same time, the frontier at equal budgets
FRONTIER=(
  "mc2-r128-asvd  --loops 2 --sharing middle_cycle --lora-rank 128 --lora-init asvd --init average"
  "mc2-r64-asvd   --loops 2 --sharing middle_cycle --lora-rank 64  --lora-init asvd --init average"
  "cyc3-r128-asvd --loops 3 --sharing cycle        --lora-rank 128 --lora-init asvd --init average"
  "mc2-r128-svd   --loops 2 --sharing middle_cycle --lora-rank 128 --lora-init svd  --init average"
  "mc2-r128-step  --loops 2 --sharing middle_cycle --lora-rank 128 --lora-init asvd --init stepwise"
)
FR_PIDS=()
for spec in "${FRONTIER[@]:0:$FRONTIER_MAX}"; do
  read -r name args <<< "$spec"
  # shellcheck disable=SC2086
  train "$name" 2 uptrain --base smollm2-135m $args "${COMMON[@]}" "${FR_OPT[@]}" &
  FR_PIDS+=($!)
done
# the exits ablation: co-trained from the start, the same total tokens as uptrain + post-trained exits
COTRAIN_TOKENS=$($PY -c "from model.training.train import parse_tokens as p; print(p('$FRONTIER_TOKENS') + p('$FRONTIER_EXIT_TOKENS'))")
train mc2-r128-cotrain 2 uptrain "${CONV[@]}" --loops 2 --lora-rank 128 --with-exits "${COMMON[@]}" \
    --batch-size "$FRONTIER_BATCH" --grad-accum 2 --lr 5e-4 --warmup 20 --eval-every 0 \
    --tokens "$COTRAIN_TOKENS" --max-seconds "$(( FRONTIER_SECONDS + FRONTIER_SECONDS / 4 ))" &
FR_PIDS+=($!)
wait "${FR_PIDS[@]}"
train mc2-r128-post 2 exits --from "$RUNS/mc2-r128-asvd" "${COMMON[@]}" --batch-size "$FRONTIER_BATCH" \
    --grad-accum 2 --lr 2e-4 --halting-lr 3e-3 --warmup 10 --eval-every 0 --tokens "$FRONTIER_EXIT_TOKENS" \
    --max-seconds "$(( FRONTIER_SECONDS / 4 ))"

# 3. held-out evaluation of the frontier on the GPU (untrained conversions: docs/RESULTS.md, CPU)
mark "eval frontier"
SPECS=()
for name in mc2-r128-asvd mc2-r64-asvd cyc3-r128-asvd mc2-r128-svd mc2-r128-step mc2-r128-cotrain mc2-r128-post; do
  [ -f "$RUNS/$name/checkpoint/config.json" ] && SPECS+=("$name=$RUNS/$name")
done
$PY -m model.evaluation --model teacher --compare "${SPECS[@]}" --device auto --sweep-tokens 0 \
    --max-tokens "$EVAL_TOKENS" --batch-size 8 --threads 4 --json "$OUT/eval-frontier.json" \
    > "$OUT/eval-frontier.md" 2> "$RUNS/eval-frontier.err" && mark "eval frontier done" || mark "FAILED eval frontier"

wait "$MAIN_PID"
wait  # the routed-decoding evaluation, if it is still running
collect
mark "all done"
