#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one run, most important first, inside a time budget.
#
#   bash benchmarks/gpu_suite.sh                 # on a CUDA machine; results in $OUT (default /tmp/lipkit-gpu)
#   LIPKIT_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh   # the same steps on tiny sizes, on the CPU
#
# Writes $OUT/suite.log (everything printed) and $OUT/results.jsonl (one JSON line per benchmark).
# open-clip-torch (the peer) is installed from wheels in .whl/ when that folder exists (a GPU machine
# without package access): `pip download --no-deps -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13`.
# LIPKIT_SUITE_BUDGET (seconds, default 540) bounds the whole run: a step that might not finish in
# what is left is skipped, and said so in the log.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lipkit-gpu}
mkdir -p "$OUT"
LOG=$OUT/suite.log
RES=$OUT/results.jsonl
BUDGET=${LIPKIT_SUITE_BUDGET:-540}
START=$(date +%s)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ! $PY -c "import open_clip" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/lipkit-site .whl/*.whl
    export PYTHONPATH=/tmp/lipkit-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}

# step NAME SECONDS COMMAND...: run COMMAND with a limit of SECONDS, if that much of the budget is left.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt "$limit" ]; then
        echo "=== $name: skipped ($left s of the budget left, needs up to $limit s)" | tee -a "$LOG"
        return
    fi
    echo "=== $name ($(date -u +%FT%TZ)): $*" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $(($(date +%s) - t0)) s" | tee -a "$LOG"
}

if [ "${LIPKIT_SUITE_SMOKE:-0}" = 1 ]; then
    DEV=cpu PREC=fp32 B32=(--model tiny --batch-size 32) B16=(--model micro --batch-size 16)
    ROUNDS=(--rounds 1 --steps 2) LOSS_B=4096 LOSS_TILE=1024 ACC=(--model micro --batch-size 64 --micro 16)
    BLOCK=(--width 64 --heads 4 --tokens 50 --batch-size 4)
else
    DEV=cuda PREC=bf16 B32=(--model ViT-B-32 --batch-size 1024) B16=(--model ViT-B-16 --batch-size 512)
    ROUNDS=(--rounds 3 --steps 10) LOSS_B=262144 LOSS_TILE=4096 ACC=(--model ViT-B-16 --batch-size 65536 --micro 512)
    BLOCK=(--batch-size 512 --steps 10)  # ViT-B-16's image block at batch 512
fi
TP=(benchmarks/train_throughput.py --device $DEV --precision $PREC "${ROUNDS[@]}" --json "$RES")

step environment 60 $PY -c "
import torch, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, p.total_memory // 2**30, 'GiB', p.multi_processor_count, 'SMs')
import open_clip; print('open_clip', open_clip.__version__)"
step throughput-b32-eager 120 $PY "${TP[@]}" "${B32[@]}" --trainer
step throughput-b16-eager 150 $PY "${TP[@]}" "${B16[@]}" --trainer --profile 25
step streaming-infonce 90 $PY benchmarks/loss_memory.py --batch-size $LOSS_B --tile $LOSS_TILE --device $DEV --skip-plain --json "$RES"
step streaming-sigmoid 90 $PY benchmarks/loss_memory.py --batch-size $LOSS_B --tile $LOSS_TILE --device $DEV --skip-plain --loss siglip --json "$RES"
step accumulation 180 $PY benchmarks/accumulation.py "${ACC[@]}" --device $DEV --precision $PREC --json "$RES"
step throughput-b32-compiled 200 $PY "${TP[@]}" "${B32[@]}" --compile
step throughput-b16-compiled 200 $PY "${TP[@]}" "${B16[@]}" --compile
step block-cost 60 $PY benchmarks/block_cost.py "${BLOCK[@]}" --device $DEV --precision $PREC --json "$RES"
CAPTIONS=${LIPKIT_SUITE_CAPTIONS:-.whl/captions.txt}  # real captions, one per line (see docs/benchmarks.md)
if [ -f "$CAPTIONS" ]; then
    step throughput-b32-captions 120 $PY "${TP[@]}" "${B32[@]}" --captions "$CAPTIONS"
fi
if [ "$DEV" = cuda ]; then
    step no-sync-on-cuda 150 $PY -m pytest -p no:cacheprovider -q tests/train/test_no_sync.py -k cuda
fi
echo "=== done after $(($(date +%s) - START)) s" | tee -a "$LOG"
