#!/usr/bin/env bash
# Every GPU check of issues 23 (GPU execution) and 25 (evaluation speed) in one run, since a GPU is lent for 15
# minutes a session. Here: `../shared/tools/device-pack` after `make setup`; then the device tool's `run` with
# carry [".device"] and the command `bash .device/setup.sh && bash bench/device-checks.sh`. Results go to $OUT
# (the device tool brings that folder back), else bench/results.
#   1. the CUDA-only tests (grouped expert GEMMs, the sync-free forward, LLaDA2.0's sampler syncs);
#   2. the random LLaDA-MoE-7B snapshot (14.7 GB, bf16), written once;
#   3. bench-eval on it: TC and block routing, exact and dual cache (+ threshold), GSM8K/ARC/MMLU first 8
#      documents each, projected to the whole tasks. Random weights are never confident, so the threshold's
#      gain there says nothing; the cache's speed does.
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
snapshot=out/llada-moe-7b-random
python3 -m pytest -q -p no:cacheprovider tests/test_grouped_experts.py 2>&1 | tail -15 | tee "$out/device-tests.txt"
[ -d "$snapshot" ] || python3 -m retrofit create-tiny --preset llada-moe-7b "$snapshot" 2>&1 | tail -3
timeout 480 python3 -m retrofit.tools.bench_eval --model "$snapshot" --dtype bf16 --limit 8 --routers tc,block \
  --settings "dual cache,dual cache + threshold 0.9" --out "$out" 2>&1 | tail -40
