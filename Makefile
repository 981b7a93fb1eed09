# stepjax: `make setup` once, then `make train EXP=...`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= cifar10_stepnet
WORKDIR ?= runs/$(subst :,_,$(EXP))
ARGS ?=
DATASET ?= cifar10
PLAN ?= cpu
# SEEDS=0 or 1,2: only those seeds of the study plan (default all)
SEEDS ?=
# DATA=dir: train from a local npz copy (train.npz/test.npz) instead of tensorflow-datasets
DATA ?=
ifneq ($(DATA),)
export STEPJAX_DATA_DIR := $(abspath $(DATA))
endif

# large host allocations on transparent huge pages: about 1.15x faster CPU steps (stepjax.parallel.host_pages)
export GLIBC_TUNABLES := $(if $(GLIBC_TUNABLES),$(GLIBC_TUNABLES):)glibc.malloc.hugetlb=1

.PHONY: setup lint test train list data summary study deep deep-lanes deep-status results records evaluate bench analyze lottery ode-bench ode-bench-quick \
	campaign-status campaign-wheels campaign-stage campaign-file

KERNELS := stepjax/kernels/_onednn_conv.so

setup: $(VENV)/.installed $(KERNELS)

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# the oneDNN convolutions for the CPU (pip's oneDNN wheels + the machine's g++); where they cannot be
# built, stepjax runs XLA's convolutions and setup still succeeds
$(KERNELS): csrc/onednn_conv.cc csrc/spatial_moments.cc $(VENV)/.installed
	$(PY) -m stepjax.kernels.build || echo "oneDNN extension not built: convolutions run on the XLA path"

# pyflakes, syntax errors and import order (pyproject.toml [tool.ruff]); `ruff check --fix .` mends most
lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PY) -m pytest -n 2 --dist worksteal --durations=30 tests

train: setup
	$(PY) -m stepjax.main --config $(EXP) --workdir $(WORKDIR) $(ARGS)

list: setup
	@$(PY) -m stepjax.main --list

data: setup
	$(PY) -m pip install --quiet tensorflow-cpu
	$(PY) -m stepjax.data $(DATASET)

# the accuracy study (plan in stepjax/study.py), resumable; each run's record lands in results/
study: setup
	$(PY) -m stepjax.study --plan $(PLAN) $(if $(SEEDS),--seeds $(SEEDS))

# the deep CPU protocol in the order of its issue: seed 0 of plain, SE and StepNet, the lottery at
# depth (SE in 40 % of the 54 blocks, ranked by the SE model's NSI as its analysis record holds it),
# then seeds 1 and 2 (the study analyses each pair, SE vs plain and StepNet vs SE, as soon as both
# its runs are finished), then the constant-step control, then seeds 3 and 4 of SE, StepNet and the control, then of plain, then the lottery's NSI placements
# from seed 1; every step resumes where it stopped and files its records into results/, and a
# run whose record is finished is not trained again (make deep DATA=../shared/data/cifar10); SIGUSR1 to the
# study or lottery process stops it after the run in progress (pkill -USR1 -f stepjax.analysis.lottery)
DEEP_LOTTERY := --exp cifar10_se:deep --ratio 0.4 --num-random 3 --nsi-workdir results/analysis/deep_se_vs_plain_s0 \
	--reuse none=results/deep/cifar10_resnet_deep_s0 --reuse all=results/deep/cifar10_se_deep_s0
# the lottery's two NSI placements again from training seed N (the same ranking, so the same blocks;
# none and all are the study's seed-N plain and SE runs): placement against run-to-run variation
deep_lottery_seed = --exp cifar10_se:deep --ratio 0.4 --num-random 0 --nsi-workdir results/analysis/deep_se_vs_plain_s0 \
	--reuse none=results/deep/cifar10_resnet_deep_s$(1) --reuse all=results/deep/cifar10_se_deep_s$(1) seed=$(1)
DEEP_REST := $(PY) -m stepjax.study --plan deep --seeds 1,2 && $(PY) -m stepjax.study --plan deep_controls && \
	$(PY) -m stepjax.study --plan deep_more && $(PY) -m stepjax.study --plan deep_plain_more && \
	$(PY) -m stepjax.analysis.lottery $(call deep_lottery_seed,1) && \
	$(PY) -m stepjax.analysis.lottery $(call deep_lottery_seed,2)
deep: setup
	$(PY) -m stepjax.study --plan deep --seeds 0
	$(PY) -m stepjax.analysis.lottery $(DEEP_LOTTERY)
	$(DEEP_REST)

# the same runs in two lanes at once, each pinned to its own core (LANE_CPUS, taskset lists): on 2
# cores two single-core trainings trained 1.25-1.7x the images per second of one on both
# (docs/BENCHMARKS.md, "Two trainings at once, one core each"). After seed 0 (on all cores), lane 0 trains the lottery, then
# joins lane 1 on seeds 1 and 2 and the control; the two study processes share that plan, each run
# claimed by one (stepjax.study; the lottery of seed 1 likewise). Logs: runs/deep_lane0.log, runs/deep_lane1.log. To stop both after
# their runs in progress: pkill -USR1 -f '^.venv/bin/python -m stepjax' (the pattern spares the lanes' shells).
LANE_CPUS ?= 0 1
deep-lanes: setup
	$(PY) -m stepjax.study --plan deep --seeds 0
	mkdir -p runs
	taskset -c $(word 1,$(LANE_CPUS)) sh -c '$(PY) -m stepjax.analysis.lottery $(DEEP_LOTTERY) && $(DEEP_REST)' \
		>> runs/deep_lane0.log 2>&1 & lane0=$$!; \
	taskset -c $(word 2,$(LANE_CPUS)) sh -c '$(DEEP_REST)' >> runs/deep_lane1.log 2>&1; lane1=$$?; \
	wait $$lane0; lane0=$$?; echo "deep-lanes: lane 0 ended with exit status $$lane0, lane 1 with $$lane1"; \
	[ $$lane0 = 0 ] && [ $$lane1 = 0 ]

# where the deep study stands, read without disturbing it: each run done (its accuracy), training
# (its step, by which process, the time left at its recent rate), stopped (the checkpoint a rerun
# resumes from) or pending; then its pairwise analyses (done, ready, waiting for a run)
deep-status: setup
	@$(PY) -m stepjax.study --plan deep --status
	@$(PY) -m stepjax.study --plan deep_controls --status
	@$(PY) -m stepjax.study --plan deep_more --status
	@$(PY) -m stepjax.study --plan deep_plain_more --status
	@$(PY) -m stepjax.analysis.lottery $(DEEP_LOTTERY) --status
	@$(PY) -m stepjax.analysis.lottery $(call deep_lottery_seed,1) --status
	@$(PY) -m stepjax.analysis.lottery $(call deep_lottery_seed,2) --status

# file the record of every run directory under runs/ into results/ (training does it when a run stops)
records: setup
	$(PY) -m stepjax.records runs

# every document and figure that comes from runs, regenerated from the records in results/ only
results: setup
	$(PY) -m stepjax.docs
	$(PY) -m stepjax.odebench --report-only

# speed, compile time, memory, input pipeline (docs/BENCHMARKS.md); torch for the comparison
bench: setup
	$(PY) -m benchmarks.run --docs docs/BENCHMARKS.md $(ARGS)

# test accuracy of a run's latest checkpoint, single view and flip TTA (DIR/evaluation.json)
evaluate: setup
	$(PY) -m stepjax.evaluate --workdir $(WORKDIR) $(ARGS)

# stiffness analysis of a trained run (or init:EXP for a fresh model)
analyze: setup
	$(PY) -m stepjax.analysis --workdir $(WORKDIR) $(ARGS)

lottery: setup
	$(PY) -m stepjax.analysis.lottery --exp $(EXP) $(ARGS)

summary: setup
	$(PY) -m stepjax.models --summary

ode-bench: setup
	$(PY) -m stepjax.odebench

ode-bench-quick: setup
	$(PY) -m stepjax.odebench --quick

# the GPU campaign (docs/GPU.md): the plan's state; once, the wheels the device image lacks; before a
# slot, the staging calls of the next item (DATA=/work/shared/data/cifar10); after it, DIR=<files_at>
campaign-status: setup
	$(PY) -m stepjax.campaign status

campaign-wheels: setup
	$(PY) -m stepjax.campaign wheels

campaign-stage: setup
	$(PY) -m stepjax.campaign stage $(ARGS)

campaign-file: setup
	$(PY) -m stepjax.campaign file $(DIR)
