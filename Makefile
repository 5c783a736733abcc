# minigpt — the ChatGPT recipe as Make targets. Each stage's output is a folder under runs/$(RUN)/
# and the prerequisite of the next, so `make ppo` on a fresh clone builds everything before it and
# a finished stage is skipped. `make help` lists the targets.
#
# Variables (every target):
#   RUN=default   outputs go to runs/$(RUN)/
#   PRESET=       tiny | cpu | gpu (a new run: gpu when CUDA is available, otherwise cpu)
#   SEED=         the run's seed (a new run: 0)
#   DATA=         a data source instead of the generated world, for every stage (file, folder or Hub name)
#   PRETRAIN_DATA= SFT_DATA= REWARD_DATA= PPO_DATA= EVAL_DATA=   the same for one stage's data
#                 (pretraining text, also the tokenizer's; dialogues; rankings or preference pairs;
#                 PPO prompts; held-out evaluation prompts)
#   ARGS=         key=value overrides for the stage(s) named on the command line
#   NPROC=1       processes: >1 runs the stage under `accelerate launch` (GPUs, or CPU processes)
#   ACCEL_CONFIG= an accelerate config file (configs/accelerate/*.yaml) for NPROC>1
#   ACCEL_ARGS=   more `accelerate launch` flags (e.g. --num_machines 2 --machine_rank 1 ...)
#   FORCE=        1 reruns the stage(s) named on the command line, and lets changed settings redo
#                 finished stages
#   RUNS_ROOT=runs  where runs live
# Stage-specific overrides that survive chaining: PRETRAIN_ARGS, SFT_ARGS, SAMPLES_ARGS, ...
#
# A run remembers its settings (runs/$(RUN)/settings.json, minigpt/settings.py): preset, seed, data
# and each stage's arguments, as first given. A later command that leaves one unset uses the run's
# own; one that changes it, so that finished stages would be redone, names them and stops unless FORCE=1.

RUN ?= default
PRESET ?=
SEED ?=
DATA ?=
PRETRAIN_DATA ?=
SFT_DATA ?=
REWARD_DATA ?=
PPO_DATA ?=
EVAL_DATA ?=
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

# ---- the run's settings: resolved once per command, before any recipe runs ----------------------
# minigpt/settings.py reads what the command gives and what the run remembers, refuses a silent
# redo of finished stages, writes the stamps runs/$(RUN)/.settings/<stage> (Make reruns a stage whose
# stamp is newer than its output) and hands back RUN_PRESET, RUN_SEED, RUN_<KIND>_DATA, RUN_<STAGE>_ARGS.
PIPELINE_GOALS := data tokenizer pretrain sft samples label reward ppo dpo grpo rsft alternatives compare all rlhf
STAGE_VARS := DATA TOKENIZER PRETRAIN SFT SAMPLES REWARD PPO DPO GRPO RSFT COMPARE
quote = '$(subst ','\'',$(1))'
NL := @@newline@@
define newline


endef
ifneq ($(filter $(PIPELINE_GOALS),$(MAKECMDGOALS)),)
ifeq ($(wildcard $(VENV)/.installed),)
SETUP_LOG := $(shell $(MAKE) --no-print-directory setup >&2)
endif
RESOLVED := $(shell $(PY) minigpt/settings.py --run-dir $(call quote,$(R)) --goals $(call quote,$(MAKECMDGOALS)) \
  --force $(call quote,$(FORCE)) --newline '$(NL)' --set preset=$(call quote,$(PRESET)) --set seed=$(call quote,$(SEED)) \
  $(foreach v,DATA PRETRAIN_DATA SFT_DATA REWARD_DATA PPO_DATA EVAL_DATA,--set $(call quote,$(v)=$($(v)))) \
  $(foreach v,$(STAGE_VARS),--args $(call quote,$(v)=$($(v)_ARGS))) --goal-args $(call quote,$(ARGS)))
$(eval $(subst $(NL),$(newline),$(RESOLVED)))
endif

COMMON = --run $(RUN) --runs-root $(RUNS_ROOT) --seed $(RUN_SEED) --preset $(RUN_PRESET)
data_arg = $(if $(2),$(1) $(2))

.PHONY: help setup test data tokenizer pretrain sft samples label reward ppo dpo grpo rsft alternatives compare all rlhf chat sample bench clean-run
.DEFAULT_GOAL := help

help:
	@echo "minigpt: make setup | data | tokenizer | pretrain | sft | samples | label | reward | ppo | compare | all"
	@echo "         make dpo | grpo | rsft | alternatives (all three, after the main pipeline; not part of all)"
	@echo "         make rlhf ROUNDS=N | chat [STAGE=ppo] | sample PROMPT='...' | bench [RUN=] | test"
	@echo "variables: RUN PRESET SEED DATA *_DATA ARGS NPROC ACCEL_CONFIG FORCE (see the top of the Makefile)"

# ---- set-up: torch first (a CPU build here; TORCH_SPEC picks another), then the package ---------
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# one pytest worker per core (pytest-xdist), each test single-threaded: most of the suite is small
# subprocesses that one thread runs as fast as two, so the cores are better used side by side
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto tests

# ---- the pipeline ------------------------------------------------------------------------------
$(R)/.settings/%:  # written by minigpt/settings.py above; this rule only lets Make accept them
	@mkdir -p $(@D) && touch $@

data: $(R)/data/stats.json
$(R)/data/stats.json: $(R)/.settings/data | setup
	$(PY) data/generate.py --out $(R)/data --seed $(RUN_SEED) --preset $(RUN_PRESET) $(RUN_DATA_ARGS)

tokenizer: $(R)/tokenizer/metrics.json
$(R)/tokenizer/metrics.json: $(R)/data/stats.json $(R)/.settings/tokenizer
	$(PY) stages/tokenizer.py $(COMMON) $(call data_arg,--data,$(RUN_PRETRAIN_DATA)) $(RUN_TOKENIZER_ARGS)

pretrain: $(R)/pretrain/metrics.json
$(R)/pretrain/metrics.json: $(R)/tokenizer/metrics.json $(R)/.settings/pretrain
	$(LAUNCH) stages/pretrain.py $(COMMON) $(call data_arg,--data,$(RUN_PRETRAIN_DATA)) $(RUN_PRETRAIN_ARGS)

sft: $(R)/sft/metrics.json
$(R)/sft/metrics.json: $(R)/pretrain/metrics.json $(R)/.settings/sft
	$(LAUNCH) stages/sft.py $(COMMON) $(call data_arg,--data,$(RUN_SFT_DATA)) $(call data_arg,--eval-data,$(RUN_EVAL_DATA)) $(RUN_SFT_ARGS)

samples: $(R)/samples/metrics.json
$(R)/samples/metrics.json: $(R)/sft/metrics.json $(R)/.settings/samples
	$(PY) stages/samples.py $(COMMON) $(RUN_SAMPLES_ARGS)  # sampling only: one process

label: $(R)/samples/metrics.json
	$(PY) -m minigpt.label --run $(RUN) --runs-root $(RUNS_ROOT) $(ARGS)

# With its own REWARD_DATA the reward model needs no ranked samples of the run.
reward: $(R)/reward/metrics.json
$(R)/reward/metrics.json: $(if $(RUN_REWARD_DATA),$(R)/sft/metrics.json,$(R)/samples/metrics.json) $(R)/.settings/reward
	$(LAUNCH) stages/reward.py $(COMMON) $(call data_arg,--data,$(RUN_REWARD_DATA)) $(call data_arg,--eval-data,$(RUN_EVAL_DATA)) $(RUN_REWARD_ARGS)

ppo: $(R)/ppo/metrics.json
# Under `make all`'s time budget (cpu) round 1's PPO, like every later round's, gets only the time left as
# max_time (at least 90 s; minigpt/rounds.py), so a machine that reaches PPO late still ends on time.
ROUND_1_TIME_LIMIT = $(if $(and $(filter all,$(MAKECMDGOALS)),$(filter-out 0,$(ALL_BUDGET))),$$($(PY) -m minigpt.rounds \
  --run $(RUN) --runs-root $(RUNS_ROOT) --time-budget $(ALL_BUDGET) --ppo-args $(call quote,$(RUN_PPO_ARGS)) --round-1-time-limit))
$(R)/ppo/metrics.json: $(R)/reward/metrics.json $(R)/.settings/ppo
	$(LAUNCH) stages/ppo.py $(COMMON) $(call data_arg,--data,$(RUN_PPO_DATA)) $(call data_arg,--eval-data,$(RUN_EVAL_DATA)) $(RUN_PPO_ARGS) $(ROUND_1_TIME_LIMIT)

# ---- the alternatives to PPO: DPO on the ranked samples, GRPO with the reward model, and rejection
# sampling (RSFT: SFT on the reward model's best of k answers) ---------------------------------------
# DPO learns from the rankings the reward model learns from: the run's ranked samples, or REWARD_DATA.
dpo: $(R)/dpo/metrics.json
$(R)/dpo/metrics.json: $(if $(RUN_REWARD_DATA),$(R)/sft/metrics.json,$(R)/samples/metrics.json) $(R)/.settings/dpo
	$(LAUNCH) stages/dpo.py $(COMMON) $(call data_arg,--data,$(RUN_REWARD_DATA)) $(call data_arg,--eval-data,$(RUN_EVAL_DATA)) $(RUN_DPO_ARGS)

grpo: $(R)/grpo/metrics.json
$(R)/grpo/metrics.json: $(R)/reward/metrics.json $(R)/.settings/grpo
	$(LAUNCH) stages/grpo.py $(COMMON) $(call data_arg,--data,$(RUN_PPO_DATA)) $(call data_arg,--eval-data,$(RUN_EVAL_DATA)) $(RUN_GRPO_ARGS)

rsft: $(R)/rsft/metrics.json
$(R)/rsft/metrics.json: $(R)/reward/metrics.json $(R)/.settings/rsft
	$(LAUNCH) stages/rsft.py $(COMMON) $(call data_arg,--data,$(RUN_PPO_DATA)) $(call data_arg,--eval-data,$(RUN_EVAL_DATA)) $(RUN_RSFT_ARGS)

alternatives: $(R)/ppo/metrics.json $(R)/dpo/metrics.json $(R)/grpo/metrics.json $(R)/rsft/metrics.json
	@echo "minigpt: PPO, DPO, GRPO and RSFT of runs/$(RUN) are done"

# `make all` runs up to ALL_ROUNDS rounds of sample → rank → reward model → PPO (round 1 is the
# pipeline's own; each later one starts from the last policy, minigpt/rounds.py), starting another
# only while the run should still end within ALL_BUDGET seconds (a started round's PPO gets the time
# left as max_time): cpu up to 3 rounds in 18 minutes from the world's first file, which leaves a fresh
# clone's set-up (about a minute) and the report (30-40 s) inside its 20 minutes; tiny and gpu one.
# `make rlhf ROUNDS=N` runs N whatever the time.
# Every round's stages get the run's own arguments for them (SAMPLES_ARGS, REWARD_ARGS, PPO_ARGS).
ROUND_STAGE_ARGS = --samples-args $(call quote,$(RUN_SAMPLES_ARGS)) --reward-args $(call quote,$(RUN_REWARD_ARGS)) \
  --ppo-args $(call quote,$(RUN_PPO_ARGS))
ALL_ROUNDS ?= $(if $(filter cpu,$(RUN_PRESET)),3,1)
ALL_BUDGET ?= $(if $(filter cpu,$(RUN_PRESET)),1080,0)
ALL_ROUNDS_DONE := $(if $(filter all,$(MAKECMDGOALS)),$(if $(filter-out 1,$(ALL_ROUNDS)),$(R)/rounds/summary.json))
$(R)/rounds/summary.json: $(R)/ppo/metrics.json
	$(PY) -m minigpt.rounds --run $(RUN) --runs-root $(RUNS_ROOT) --rounds $(ALL_ROUNDS) --time-budget $(ALL_BUDGET) --seed $(RUN_SEED) --preset $(RUN_PRESET) --launch "$(LAUNCH)" $(ROUND_STAGE_ARGS)

compare: $(R)/compare/report.json
$(R)/compare/report.json: $(R)/ppo/metrics.json $(ALL_ROUNDS_DONE) $(R)/.settings/compare
	$(PY) -m minigpt.compare --run $(RUN) --runs-root $(RUNS_ROOT) --seed $(RUN_SEED) --preset $(RUN_PRESET) $(call data_arg,--sft-data,$(RUN_SFT_DATA)) $(call data_arg,--eval-data,$(RUN_EVAL_DATA)) $(RUN_COMPARE_ARGS)

all: compare
	@echo "minigpt: every stage of runs/$(RUN) is done; the report is $(R)/compare/report.html"

rlhf: $(R)/ppo/metrics.json
	$(PY) -m minigpt.rounds --run $(RUN) --runs-root $(RUNS_ROOT) --rounds $(ROUNDS) --seed $(RUN_SEED) --preset $(RUN_PRESET) --launch "$(LAUNCH)" $(ROUND_STAGE_ARGS) $(ARGS)

# ---- using the models --------------------------------------------------------------------------
chat: | setup
	$(PY) -m minigpt.chat --ckpt $(R)/$(STAGE) $(ARGS)

sample: | setup
	$(PY) -m minigpt.sample --ckpt $(R)/$(STAGE) --prompt "$(PROMPT)" $(ARGS)

bench: | setup
	$(PY) -m minigpt.bench --run $(R) $(ARGS)

clean-run:
	rm -rf $(R)
