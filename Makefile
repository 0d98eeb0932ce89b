# `make setup` then `make test`: the two commands the README and CI (.ci/run) use.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH_CPU = torch==2.13.0

.PHONY: setup test bench bench-7b bench-eval clean tiny small demo studies study-convergence study-schedules study-block-tradeoff \
	study-from-scratch

setup: $(VENV)/.installed

# The CPU build of torch lies on the local disk; a bare `torch` requirement would pull a multi-GB CUDA build,
# so it is installed first, and only where the venv has no torch yet.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m retrofit.eval.install_hook
	touch $@

test: setup
	$(PY) -m pytest -q

# Benchmark of the MoE paths (several minutes); results in bench/results/bench.{md,json}. Where CUDA is present the
# layer tables run on the GPU in bf16 (BENCH_ARGS="--device cpu" keeps them on the CPU; "--layers-only" skips the
# CPU tables of the tiny model).
BENCH_ARGS ?=
bench: setup
	$(PY) -m retrofit.tools.bench --out bench/results $(BENCH_ARGS)

# The real model's size (not part of `make test`): convert, load, forward, finetune and eval a random
# LLaDA-MoE-7B-A1B snapshot (written on first use, 14.7 GB; ~30 GB of disk in all); results in
# bench/results/bench-7b.{md,json}. SNAPSHOT=DIR reuses a snapshot made by `retrofit create-tiny --preset llada-moe-7b`.
SNAPSHOT ?= out/llada-moe-7b-random
bench-7b: setup
	$(PY) -m retrofit.tools.bench_7b --snapshot $(SNAPSHOT) --out bench/results

# Evaluation speed per router and decoding setting (exact, threshold, caches), projected to whole tasks; results in
# bench/results/bench-eval.{md,json}. On a CPU with the embedded tiny (~10 min); on a GPU at full size:
# make bench-eval EVAL_MODEL=out/llada-moe-7b-random BENCH_EVAL_ARGS="--dtype bf16 --limit 16".
EVAL_MODEL ?= tiny
BENCH_EVAL_ARGS ?= --guard-size 2 --limit 8 --gen-length 128
bench-eval: setup
	$(PY) -m retrofit.tools.bench_eval --model $(EVAL_MODEL) --out bench/results $(BENCH_EVAL_ARGS)

# The models retrofit pretrains itself from scratch with its own code, on GSM8K train text with one BPE tokenizer:
# `make tiny` retrains the embedded one (retrofit/assets/tiny; 8 experts top-2; ~15 min on 2 cores); `make small`
# builds `small` (--src small: LLaDA-MoE's routing geometry, 64 experts top-8; ~34 min), 14 MB in bf16, too large
# to ship, so it is packed into the cache (~/.cache/retrofit/small-v1, or $$RETROFIT_CACHE).
SHAPE_tiny  = --hidden-size 128 --layers 3 --heads 4 --experts 8 --top-k 2 --expert-size 160
SHAPE_small = --hidden-size 128 --layers 4 --heads 4 --experts 64 --top-k 8 --expert-size 64
tiny small: setup
	$(VENV)/bin/retrofit create-tiny out/$@-init --force --tokenizer-data ../shared/data/gsm8k/train.jsonl \
		--vocab-size 1536 $(SHAPE_$@) --shard-kb 100000
	rm -rf out/$@-pretrain
	$(VENV)/bin/retrofit finetune recipes/$@-pretrain.yaml
	$(PY) -m retrofit.tools.embedded --name $@ out/$@-pretrain

# The papers' claims measured on `tiny` (studies/<name>/README.md; resumable, run folders in out/studies/), or on
# `small` with STUDY_ARGS="--model small" (after `make small`; studies/<name>/small/). `make studies` then writes
# the README's summary of the claims from every study's results.json.
# Times of the last full runs (2026-12-04, 2-core EPYC; the first three on one thread each, two at a time, as
# OMP_NUM_THREADS=1 allows; from-scratch alone, its report has wall-clock): tiny: convergence ~15 min, schedules
# ~30 min, block-tradeoff ~15 min, from-scratch 17 min; small: convergence ~25 min, from-scratch 35 min.
STUDIES = study-convergence study-schedules study-block-tradeoff study-from-scratch
$(STUDIES): study-%: setup
	$(VENV)/bin/retrofit study $* $(STUDY_ARGS)

studies: $(STUDIES)
	$(PY) -m retrofit.studies.claims --write README.md

# The whole tool on the embedded tiny model: convert, fine-tune, evaluate, one comparison table.
# Options go through DEMO_ARGS, e.g. `make demo DEMO_ARGS="--limit 32"` (see `python -m retrofit.tools.demo --help`).
demo: setup
	$(PY) -m retrofit.tools.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
