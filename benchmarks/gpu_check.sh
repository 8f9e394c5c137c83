#!/usr/bin/env bash
# tinyGPT on a GPU, in one prepared run meant to take under 8 minutes: the CUDA checks, the seed preset's
# speed (eager and compiled, MFU against this GPU's measured bf16 matmul ceiling), 300 real
# iterations of the seed preset -> the projected time of its 10,000, batch-1 generation, and
# `tinygpt bench --device cuda` as it stands. A short table comes last; full logs go to $OUT.
#
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh [DATA_DIR]
#
# DATA_DIR: a prepared character data directory for the 300 iterations (default
# data/tinyshakespeare; prepared from shared/data/tinyshakespeare.txt or
# ../shared/data/tinyshakespeare.txt when missing). Needs python3 with torch; runs the package
# from src/ (no install). Without a CUDA GPU every part is skipped, with the reason.
# GPU_CHECK_DRY_RUN=1 runs every part but the CUDA checks on the CPU with the tiny preset, to
# test this script itself before GPU time is spent on it (tests/test_gpu_check.py does).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
DATA=${1:-data/tinyshakespeare}
mkdir -p "$OUT"
DEVICE=cuda PRESET=seed BATCH=256 ITERS=300 REPEATS=20 NEW_TOKENS=500 EVAL_ITERS=10
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu PRESET=tiny BATCH=8 ITERS=20 REPEATS=2 NEW_TOKENS=20 EVAL_ITERS=2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
STATUS="$OUT/status.tsv"   # part <tab> result <tab> detail, one line per part: the table
: > "$STATUS"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$STATUS"; }
PARTS=("cuda checks" "seed eager" "seed compiled" "seed 300 iterations" "bench as it stands")

table() {
    echo
    echo "== gpu_check: $(date -u +%FT%TZ), logs in $OUT =="
    while IFS=$'\t' read -r part result detail; do
        printf '%-20s %-5s %s\n' "$part" "$result" "$detail"
    done < "$STATUS"
}

reason=$("$PY" -c "import torch; print('' if torch.cuda.is_available() else 'no CUDA GPU (torch.cuda.is_available() is False)')" 2>&1) \
    || reason="$PY cannot import torch ($(printf '%s' "$reason" | tail -1))"
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    echo "gpu_check: a dry run on the CPU (GPU_CHECK_DRY_RUN=1): the tiny preset, no CUDA checks"
elif [ -n "$reason" ]; then
    echo "gpu_check: $reason; every CUDA part is skipped"
    for part in "${PARTS[@]}"; do record "$part" SKIP "$reason"; done
    table
    exit 0
fi

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" > "$OUT/torch.txt" 2>&1

# 1. the CUDA checks (the same functions tests/test_cuda.py runs under pytest)
if [ "$DEVICE" != cuda ]; then
    record "cuda checks" SKIP "a dry run on the CPU"
elif timeout 300 "$PY" benchmarks/cuda_checks.py --out "$OUT/checks" > "$OUT/cuda_checks.log" 2>&1; then
    record "cuda checks" PASS "$(tail -1 "$OUT/cuda_checks.log")"
else
    record "cuda checks" FAIL "$(grep -E '^(FAIL|PASS)' "$OUT/cuda_checks.log" | tr '\n' ';' | cut -c1-300)"
fi

# 2. the seed preset at batch 256: tokens/s, MFU against the measured bf16 ceiling, batch-1 generation
bench_row() {  # part, json file
    "$PY" - "$2" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
t, g = r["training"], r["generation"]
print(f"{t['tokens_per_second']:,.0f} tok/s, {t['achieved_flops'] / 1e12:.2f} TFLOP/s = "
      f"{100 * t['fraction_of_bfloat16_ceiling']:.1f} % of measured bf16 {r['ceilings']['bfloat16'] / 1e12:.2f} TFLOP/s; "
      f"batch-1 decode {g['cached_tokens_per_second']:,.0f} tok/s cached, {g['uncached_tokens_per_second']:,.0f} uncached")
PYEOF
}
for mode in eager compiled; do
    flag=""; [ "$mode" = compiled ] && flag="--compile"
    if timeout 240 "$PY" -m tinygpt bench --preset "$PRESET" --batch-size "$BATCH" --device "$DEVICE" \
            --repeats "$REPEATS" --new-tokens "$NEW_TOKENS" $flag --json > "$OUT/bench_seed_$mode.json" 2> "$OUT/bench_seed_$mode.log"; then
        record "seed $mode" PASS "$(bench_row "seed $mode" "$OUT/bench_seed_$mode.json" 2>&1)"
    else
        record "seed $mode" FAIL "exit $?; see $OUT/bench_seed_$mode.log"
    fi
done

# 3. 300 real iterations of the seed preset on the Shakespeare text -> the full 10,000
if [ ! -f "$DATA/meta.json" ]; then
    for corpus in shared/data/tinyshakespeare.txt ../shared/data/tinyshakespeare.txt; do
        if [ -f "$corpus" ]; then
            "$PY" -m tinygpt prepare "$corpus" --out "$DATA" --no-progress > "$OUT/prepare.log" 2>&1 && break
        fi
    done
fi
if [ -f "$DATA/meta.json" ]; then
    if timeout 300 "$PY" -m tinygpt train --data "$DATA" --out "$OUT/seed300" --preset "$PRESET" --max-iters "$ITERS" \
            --set "eval_interval=$ITERS" --set "eval_iters=$EVAL_ITERS" --device "$DEVICE" --no-progress --overwrite \
            > "$OUT/seed300.log" 2>&1; then
        record "seed 300 iterations" PASS "$("$PY" - "$OUT/seed300" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1] + "/last.json"))
seconds = r["elapsed"]
print(f"{r['iteration']} iterations in {seconds:.1f} s (evaluation included) -> 10,000 in about "
      f"{seconds / r['iteration'] * 10000 / 60:.1f} min; val loss {r['val_loss']:.3f}")
PYEOF
)"
    else
        record "seed 300 iterations" FAIL "exit $?; see $OUT/seed300.log"
    fi
else
    record "seed 300 iterations" SKIP "no data: pass a prepared DATA_DIR or provide shared/data/tinyshakespeare.txt"
fi

# 4. tinygpt bench as it stands
if timeout 180 "$PY" -m tinygpt bench --device "$DEVICE" $([ "$DEVICE" = cpu ] && echo --repeats 1 --new-tokens 20) --json > "$OUT/bench_default.json" 2> "$OUT/bench_default.log"; then
    record "bench as it stands" PASS "$(bench_row bench "$OUT/bench_default.json" 2>&1)"
else
    record "bench as it stands" FAIL "exit $?; see $OUT/bench_default.log"
fi
table
