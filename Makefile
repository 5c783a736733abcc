# minigpt — the ChatGPT recipe as Make targets. Each stage's output is a folder under runs/$(RUN)/
# and the prerequisite of the next, so `make ppo` on a fresh clone builds everything before it and
# a finished stage is skipped. `make help` lists the targets.
#
# Variables (every target):
#   RUN=default   outputs go to runs/$(RUN)/
#   PRESET=       tiny | cpu | gpu (empty: gpu when CUDA is available, otherwise cpu)
#   SEED=0        the run's seed
#   DATA=         a data source instead of the generated world (file, folder or Hub name)
#   ARGS=         key=value overrides for the stage(s) named on the command line
#   NPROC=1       processes: >1 runs the stage under `accelerate launch` (GPUs, or CPU processes)
#   ACCEL_CONFIG= an accelerate config file (configs/accelerate/*.yaml) for NPROC>1
#   ACCEL_ARGS=   more `accelerate launch` flags (e.g. --num_machines 2 --machine_rank 1 ...)
#   FORCE=        1 reruns the stage(s) named on the command line
#   RUNS_ROOT=runs  where runs live
# Stage-specific overrides that survive chaining: PRETRAIN_ARGS, SFT_ARGS, SAMPLES_ARGS, ...

RUN ?= default
PRESET ?=
SEED ?= 0
DATA ?=
ARGS ?=
NPROC ?= 1
ACCEL_CONFIG ?=
FORCE ?=
ROUNDS ?= 2
STAGE ?= ppo
TORCH_SPEC ?= torch==2.13.0

VENV := .venv
PY := $(VENV)/bin/python
RUNS_ROOT ?= runs
R := $(RUNS_ROOT)/$(RUN)
export PYTHONUNBUFFERED := 1

# `accelerate launch` for several processes: one per GPU, or N CPU processes over gloo. Without
# CUDA, --multi_gpu still starts N processes, but each one thinks it is alone (world size 1) unless
# ACCELERATE_USE_CPU is set; with it they join one gloo group. (`--cpu --num_processes N` would
# silently start a single process.) NPROC (all processes, on all machines) overrides the config
# file's num_processes; ACCEL_ARGS adds launch flags, e.g. for several machines (docs/distributed.md).
ACCEL_ARGS ?=
ifeq ($(NPROC),1)
LAUNCH := $(PY)
else
CUDA_AVAILABLE := $(shell if test -x $(PY); then $(PY) -c "import torch; print(int(torch.cuda.is_available()))"; \
                          elif nvidia-smi -L >/dev/null 2>&1; then echo 1; else echo 0; fi)
export ACCELERATE_USE_CPU := $(if $(filter 1,$(CUDA_AVAILABLE)),false,true)
ifneq ($(ACCEL_CONFIG),)
LAUNCH := $(VENV)/bin/accelerate launch --config_file $(ACCEL_CONFIG) --num_processes $(NPROC) $(ACCEL_ARGS)
else
LAUNCH := $(VENV)/bin/accelerate launch --multi_gpu --num_processes $(NPROC) --num_machines 1 --mixed_precision no --dynamo_backend no $(ACCEL_ARGS)
endif
endif

COMMON = --run $(RUN) --runs-root $(RUNS_ROOT) --seed $(SEED) $(if $(PRESET),--preset $(PRESET)) $(if $(DATA),--data $(DATA))
# ARGS goes to the stages named on the command line; <STAGE>_ARGS always to that stage.
stage_args = $($(1)_ARGS) $(if $(filter $(2),$(MAKECMDGOALS)),$(ARGS))
# A stage reruns when its settings change: the stamp is rewritten only when they differ.
define stamp
	@mkdir -p $(R)/.settings
	@echo '$(PRESET) $(SEED) $(DATA) $(call stage_args,$(1),$(2)) $(if $(and $(FORCE),$(filter $(2),$(MAKECMDGOALS))),force-$(shell date +%s%N))' > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi
endef

.PHONY: help setup test data tokenizer pretrain sft samples label reward ppo dpo grpo alternatives compare all rlhf chat sample bench clean-run settings
.DEFAULT_GOAL := help

help:
	@echo "minigpt: make setup | data | tokenizer | pretrain | sft | samples | label | reward | ppo | compare | all"
	@echo "         make dpo | grpo | alternatives (both, after the main pipeline; not part of all)"
	@echo "         make rlhf ROUNDS=N | chat [STAGE=ppo] | sample PROMPT='...' | bench | test"
	@echo "variables: RUN PRESET SEED DATA ARGS NPROC ACCEL_CONFIG FORCE (see the top of the Makefile)"

# ---- set-up: torch first (a CPU build here; TORCH_SPEC picks another), then the package ---------
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# ---- the pipeline ------------------------------------------------------------------------------
$(R)/.settings/%: settings
	$(call stamp,$(shell echo $* | tr a-z A-Z),$*)
settings: ;

data: $(R)/data/stats.json
$(R)/data/stats.json: $(R)/.settings/data | setup
	$(PY) data/generate.py --out $(R)/data --seed $(SEED) $(if $(PRESET),--preset $(PRESET)) $(call stage_args,DATA,data)

tokenizer: $(R)/tokenizer/metrics.json
$(R)/tokenizer/metrics.json: $(R)/data/stats.json $(R)/.settings/tokenizer
	$(PY) stages/tokenizer.py $(COMMON) $(call stage_args,TOKENIZER,tokenizer)

pretrain: $(R)/pretrain/metrics.json
$(R)/pretrain/metrics.json: $(R)/tokenizer/metrics.json $(R)/.settings/pretrain
	$(LAUNCH) stages/pretrain.py $(COMMON) $(call stage_args,PRETRAIN,pretrain)

sft: $(R)/sft/metrics.json
$(R)/sft/metrics.json: $(R)/pretrain/metrics.json $(R)/.settings/sft
	$(LAUNCH) stages/sft.py $(COMMON) $(call stage_args,SFT,sft)

samples: $(R)/samples/metrics.json
$(R)/samples/metrics.json: $(R)/sft/metrics.json $(R)/.settings/samples
	$(PY) stages/samples.py $(COMMON) $(call stage_args,SAMPLES,samples)  # sampling only: one process

label: $(R)/samples/metrics.json
	$(PY) -m minigpt.label --run $(RUN) --runs-root $(RUNS_ROOT) $(ARGS)

reward: $(R)/reward/metrics.json
$(R)/reward/metrics.json: $(R)/samples/metrics.json $(R)/.settings/reward
	$(LAUNCH) stages/reward.py $(COMMON) $(call stage_args,REWARD,reward)

ppo: $(R)/ppo/metrics.json
$(R)/ppo/metrics.json: $(R)/reward/metrics.json $(R)/.settings/ppo
	$(LAUNCH) stages/ppo.py $(COMMON) $(call stage_args,PPO,ppo)

# ---- the alternatives to PPO: DPO on the ranked samples, GRPO with the reward model -------------
dpo: $(R)/dpo/metrics.json
$(R)/dpo/metrics.json: $(R)/samples/metrics.json $(R)/.settings/dpo
	$(LAUNCH) stages/dpo.py $(COMMON) $(call stage_args,DPO,dpo)

grpo: $(R)/grpo/metrics.json
$(R)/grpo/metrics.json: $(R)/reward/metrics.json $(R)/.settings/grpo
	$(LAUNCH) stages/grpo.py $(COMMON) $(call stage_args,GRPO,grpo)

alternatives: $(R)/ppo/metrics.json $(R)/dpo/metrics.json $(R)/grpo/metrics.json
	@echo "minigpt: PPO, DPO and GRPO of runs/$(RUN) are done"

compare: $(R)/compare/report.json
$(R)/compare/report.json: $(R)/ppo/metrics.json $(R)/.settings/compare
	$(PY) -m minigpt.compare --run $(RUN) --runs-root $(RUNS_ROOT) --seed $(SEED) $(if $(PRESET),--preset $(PRESET)) $(call stage_args,COMPARE,compare)

all: compare
	@echo "minigpt: every stage of runs/$(RUN) is done; the report is $(R)/compare/report.html"

rlhf: $(R)/ppo/metrics.json
	$(PY) -m minigpt.rounds --run $(RUN) --runs-root $(RUNS_ROOT) --rounds $(ROUNDS) --seed $(SEED) $(if $(PRESET),--preset $(PRESET)) --launch "$(LAUNCH)" $(ARGS)

# ---- using the models --------------------------------------------------------------------------
chat: | setup
	$(PY) -m minigpt.chat --ckpt $(R)/$(STAGE) $(ARGS)

sample: | setup
	$(PY) -m minigpt.sample --ckpt $(R)/$(STAGE) --prompt "$(PROMPT)" $(ARGS)

bench: | setup
	$(PY) -m minigpt.bench $(ARGS)

clean-run:
	rm -rf $(R)
