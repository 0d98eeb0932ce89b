#!/usr/bin/env bash
# Every GPU check of issues 23 (GPU execution) and 25 (evaluation speed) in one run, since a GPU is lent for 15
# minutes a session. Here: `../shared/tools/device-pack` after `make setup`; then the device tool's `run` with
# carry [".device"], timeout_s 600 and the command `bash .device/setup.sh && bash bench/device-checks.sh`.
# Results go to $OUT (the device tool brings that folder back, 8 files at most), else bench/results.
# The stages run in the order of what the issues need most, each within what is left of BUDGET seconds (570):
#   1. the CUDA-only tests (grouped expert GEMMs, the sync-free forward, the samplers' syncs) and the CPU count of
#      host reads (tests/test_host_syncs.py);
#   2. `make bench`'s layer tables on the GPU (tables 1, 2, 5 in bf16, with their weight-read limits and targets);
#   3. `make bench-7b` (writes the random LLaDA-MoE-7B snapshot first, 14.7 GB): convert, per-router forward,
#      generation and router-only step on the GPU, finetune, eval, hash;
#   4. bench-eval on the snapshot with what time is left: TC and block routing, the dual cache (+ threshold),
#      projected to whole tasks. Random weights are never confident, so the threshold's gain there says nothing.
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
snapshot=out/llada-moe-7b-random
deadline=$((SECONDS + ${BUDGET:-570}))
log="$out/device-checks.txt"

stage() {  # stage CAP NAME COMMAND...: COMMAND for at most CAP seconds, or what is left before the deadline
  local cap=$1 name=$2 start=$SECONDS left=$((deadline - SECONDS))
  shift 2
  if (( left < 60 )); then echo "[device-checks] $name: skipped, ${left} s left" | tee -a "$log"; return; fi
  (( cap > left )) && cap=$left
  echo "[device-checks] $name (at most ${cap} s)" | tee -a "$log"
  timeout "$cap" "$@"
  echo "[device-checks] $name: rc $?, $((SECONDS - start)) s" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$log" 2>&1
stage 90 "CUDA tests" bash -c "python3 -m pytest -q -p no:cacheprovider tests/test_grouped_experts.py \
  tests/test_host_syncs.py 2>&1 | tail -15 | tee '$out/device-tests.txt'"
stage 150 "bench (layers on the GPU)" bash -c "python3 -m retrofit.tools.bench --layers-only --out '$out' | tail -30"
stage 330 "bench-7b" bash -c "python3 -m retrofit.tools.bench_7b --snapshot $snapshot --work out/bench-7b \
  --out '$out' 2>&1 | tail -40"
[ -f "$snapshot/config.json" ] && stage 400 "bench-eval" bash -c "python3 -m retrofit.tools.bench_eval \
  --model $snapshot --dtype bf16 --limit 4 --routers tc,block --settings 'dual cache,dual cache + threshold 0.9' \
  --out '$out' 2>&1 | tail -40"
exit 0
