#!/usr/bin/env bash
# Stage what the issue-13 GPU run (benchmarks/gpu_session.sh) needs but the device machine cannot fetch,
# split into carry folders that fit the per-call upload limit next to the working tree:
#
#   bash benchmarks/gpu_stage.sh            # -> .gpu-stage/p1 ... .gpu-stage/pN (git-ignored), and the plan
#
# Payload (.gpu-stage/build/, rebuilt only when missing):
#   gguf.xz            the embedded SmolLM2-135M-Instruct Q4_1 GGUF (98.4 MB; xz -6: ~90 MB)
#   gguf-*.whl         the `gguf` package (the device image lacks it; transformers reads the GGUF with it)
#   data.tar           token cache seq512: meta.json, train.ids, the five held-out sets, val (first VAL_ROWS
#                      rows), train (first TRAIN_ROWS rows of the packed, document-shuffled train split), xz'd
#   prompts.jsonl.xz   the extended prompt pool (train-split documents only; held-out prompts are skipped
#                      at generation time by --splits train)
# The payload is one tar (payload.tar, sha256 in payload.sha256), cut into N parts of at most PART_MIB
# (64 MiB minus the working tree minus MARGIN_MIB); part k travels as carry ".gpu-stage/pk" in call k.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STAGE=.gpu-stage
BUILD=$STAGE/build
TRAIN_ROWS=${TRAIN_ROWS:-18000}       # 512-token rows of prose (18000: 9.2 M tokens)
VAL_ROWS=${VAL_ROWS:-256}
MARGIN_MIB=${MARGIN_MIB:-1}
GGUF_VERSION=${GGUF_VERSION:-0.19.0}
CACHE=${LAB_CACHE_DIR:-.cache}
grep -qx "/$STAGE/" .git/info/exclude 2>/dev/null || echo "/$STAGE/" >> .git/info/exclude
mkdir -p "$BUILD"

GGUF=$($PY -c "from model.io.folders import _gguf_folder, EMBEDDED_GGUF; print(_gguf_folder() / EMBEDDED_GGUF)")
[ -s "$BUILD/gguf.xz" ] || { echo "compressing $GGUF (minutes on 2 cores)"; xz -T2 -6 -c "$GGUF" > "$BUILD/gguf.xz.tmp" \
    && mv "$BUILD/gguf.xz.tmp" "$BUILD/gguf.xz"; }
ls "$BUILD"/gguf-*.whl > /dev/null 2>&1 || $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$BUILD" "gguf==$GGUF_VERSION"
if [ ! -s "$BUILD/data.tar" ]; then
  TMP=$(mktemp -d)
  SRC=$CACHE/data/tokens/seq512
  cp "$SRC"/meta.json "$SRC"/train.ids "$SRC"/heldout-*.npy "$TMP/"
  $PY - "$SRC" "$TMP" "$TRAIN_ROWS" "$VAL_ROWS" <<'EOF'
import sys, numpy as np
src, dst, train_rows, val_rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for name, rows in (("train", train_rows), ("val", val_rows)):
    full = np.load(f"{src}/{name}.npy", mmap_mode="r")
    np.save(f"{dst}/{name}.npy", np.ascontiguousarray(full[:rows]))
    print(f"{name}: {min(rows, len(full))} of {len(full)} rows")
with open(f"{dst}/STAGED.txt", "w") as f:
    f.write(f"staged by benchmarks/gpu_stage.sh: train.npy = first {train_rows} rows, val.npy = first {val_rows} rows "
            "of the seq512 cache (rows are packed from seeded-shuffled documents); the rest is complete\n")
EOF
  for f in "$TMP"/*.npy; do xz -T2 -6 "$f"; done
  tar -cf "$BUILD/data.tar.tmp" -C "$TMP" . && mv "$BUILD/data.tar.tmp" "$BUILD/data.tar"
  rm -rf "$TMP"
fi
[ -s "$BUILD/prompts.jsonl.xz" ] || $PY -m model.data.teacher_answers prompts --pool extended --samples 0 \
    --save "$BUILD/prompts.jsonl.xz"

# the working tree that travels with every call: tracked + untracked-not-ignored files
TREE=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null \
        | awk '{s += $1} END {print s}')
PART_BYTES=$(( (64 - MARGIN_MIB) * 1024 * 1024 - TREE ))
rm -rf "$STAGE"/p[0-9]* "$STAGE/payload.tar"
tar -cf "$STAGE/payload.tar" -C "$BUILD" .
( cd "$STAGE" && sha256sum payload.tar > payload.sha256 )
split -b "$PART_BYTES" -d -a 2 "$STAGE/payload.tar" "$STAGE/part."
N=0
for part in "$STAGE"/part.*; do
  N=$(( N + 1 )); mkdir -p "$STAGE/p$N"; mv "$part" "$STAGE/p$N/"; cp "$STAGE/payload.sha256" "$STAGE/p$N/"
done
rm -f "$STAGE/payload.tar"
echo "working tree $(( TREE / 1048576 )) MiB; payload $(du -cb "$BUILD"/* | tail -1 | cut -f1) bytes in $N part(s) of <= $(( PART_BYTES / 1048576 )) MiB:"
for k in $(seq 1 "$N"); do echo "  call $k: carry [\"$STAGE/p$k\"] ($(du -sb "$STAGE/p$k" | cut -f1) bytes)"; done
echo "calls 1..$(( N - 1 )): mkdir -p /tmp/gpu-stage && cp $STAGE/p\$k/* /tmp/gpu-stage/"
echo "call $N: the same, then STAGE=/tmp/gpu-stage bash benchmarks/gpu_session.sh (docs/TRAINING.md)"
