# InstaFlow training framework. `make help` lists every target.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(PY) -m lightning_modules.cli
DATA := runs/data/shapes
# the exact versions the embedded default was run with (all of them, transitive included); setup.cfg has ranges
CONSTRAINTS := requirements/constraints.txt
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# Values a user gives (PROMPT, MODEL, ...) reach recipes only through the environment, as MK_<NAME>, and
# recipes quote them ("$$MK_PROMPT"): a prompt holding quotes, $(...) or backticks is passed as typed, never run.
# `literal` takes a user's value as typed (make would expand $(...) in it) and this file's defaults expanded.
literal = $(if $(filter file default,$(origin $(1))),$($(1)),$(value $(1)))
# 'text' for the shell, for the paths inside the stage commands below
shq = '$(subst ','\'',$(1))'
USER_VARS := MODEL STEPS W PROMPT TEACHER PORT OUT EXP ARGS SWEEP NOTES GPUS NODES GPUS_PER_NODE PARTITION \
  TIME_LIMIT JOB_NAME SLURM_DIR LAUNCHER RDZV WORKERS
$(foreach v,$(USER_VARS),$(eval export MK_$(v) = $$(call literal,$(v))))
DATA_Q = $(call shq,$(call literal,DATA))

.DEFAULT_GOAL := help
.PHONY: help venv audit browser data data-chain train-vae train-teacher-unet train-teacher-binding train-teacher-decoder train-teacher train-evaluator eval-teacher floors \
        gen-pairs train-2rf train-distill eval report ablation generate demo export run train-reflow sweep sweep-report test test-full rehearsal bench bench-gpu memory tensorboard clean

help: ## list every target with one line each
	@echo "InstaFlow training framework. Layout (docs/architecture.md): lightning_modules/ the stages and CLI;"
	@echo "instaflow/ the library (flow/ math, models/, evaluation/, tools/ command-line mains); data/ streams and"
	@echo "shards; callbacks/ side effects; experiments/ one YAML per experiment (run one: make run EXP=<dir>/<name>)."
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]' -c $(CONSTRAINTS)
	touch $@

venv: $(VENV)/.installed ## create .venv: the project with its test and demo extras, at the exact versions of requirements/constraints.txt

audit: $(VENV)/.installed ## pip-audit of requirements/constraints.txt against PyPI's advisories (STRICT=1: a pin it cannot check fails too)
	$(PY) .ci/audit.py $(CONSTRAINTS) $(if $(filter 1,$(value STRICT)),--strict)

data: $(VENV)/.installed ## write the embedded world's LAION-layout shards (train 40k / val 2k / test 4k, and 10k three-object scenes for the teacher) to runs/data
	$(PY) -m data.shapes --out $(DATA_Q)

data-chain: $(VENV)/.installed ## only the shards the InstaFlow chain reads (train 00000-00003, val, test); same bytes as `make data`
	$(CMD_data)

train-vae: data ## embedded teacher, part 1: train the AutoencoderKL (32x32 RGB -> 8x8x4), then its decoder alone
	$(CLI) --experiment embedded/vae
	$(CLI) --experiment embedded/vae_decoder

train-teacher-unet: data ## embedded teacher, part 2: train the epsilon UNet on the VAE of part 1; exports runs/embedded/teacher_stage1
	$(CLI) --experiment embedded/teacher

runs/embedded/teacher_stage1/model_index.json:
	@echo "the growth stage starts from stage 1's export in runs/embedded/teacher_stage1: run 'make train-teacher-unet' first" >&2; exit 1

train-teacher-binding: data runs/embedded/teacher_stage1/model_index.json ## embedded teacher, part 3: grow part 2's UNet (2 transformer layers, 48 tokens), then two more cosine cycles (the last with three-object scenes oversampled); exports assets/embedded-sd with part 1's decoder (part 4 replaces it)
	$(CLI) --experiment embedded/teacher_binding
	$(CLI) --experiment embedded/teacher_binding_more
	$(CLI) --experiment embedded/teacher_binding_three

runs/embedded/teacher_build/vae/config.json:
	@echo "the decoder refinement starts from part 1's decoder in runs/embedded/teacher_build: run 'make train-vae' first" >&2; exit 1

train-teacher-decoder: data runs/embedded/teacher_build/vae/config.json ## embedded teacher, part 4: refine part 1's decoder (encoder frozen) into assets/embedded-sd/vae
	$(CLI) --experiment embedded/vae_decoder_refine

train-teacher: train-vae train-teacher-unet ## retrain the committed miniature SD teacher from scratch (about 6 h on 2 cores)
	$(MAKE) train-teacher-binding  # sub-makes: each must see the export the step before wrote
	$(MAKE) train-teacher-decoder

train-evaluator: data ## retrain the committed embedded evaluator (FID features + prompt alignment)
	$(CLI) --experiment embedded/evaluator

floors: data ## measure the evaluation floors on real test images (FID real-vs-real, alignment of real images)
	$(PY) -m instaflow.tools.floors --evaluator assets/embedded-evaluator \
	  --test $(DATA_Q)'/test/{00000..00003}.tar' --n 2000 --out docs/floors.json

eval-teacher: data ## score the committed teacher (FID, alignment, sample grid) into docs/
	$(PY) -m instaflow.tools.eval_teacher --teacher assets/embedded-sd --evaluator assets/embedded-evaluator \
	  --test $(DATA_Q)'/test/{00000..00003}.tar' --n 2000 --out docs/teacher_eval.json --grid docs/teacher_samples.png

# --- InstaFlow on the embedded default: each stage is skipped when its output exists ---------------
MODELS := runs/embedded/models
PAIRS := runs/embedded/pairs
# records each stage's wall time in runs/embedded/timings/<stage>.json (read by the results table)
TIMED = $(PY) -m instaflow.tools.timed runs/embedded/timings

# each stage's command, once: the file rules below and the cluster launch (CHAIN_STAGES) both use them
CMD_data = $(TIMED) data -- $(PY) -m data.shapes --out $(DATA_Q) --train 4000 --train3 0
CMD_pairs_teacher = $(TIMED) pairs_teacher -- $(CLI) --experiment embedded/pairs_teacher
CMD_pairs_teacher_val = $(TIMED) pairs_teacher_val -- $(CLI) --experiment embedded/pairs_teacher_val
CMD_reflow = $(TIMED) reflow -- $(CLI) --experiment embedded/reflow
CMD_pairs_rf2 = $(TIMED) pairs_rf2 -- $(CLI) --experiment embedded/pairs_rf2
CMD_pairs_rf2_val = $(TIMED) pairs_rf2_val -- $(CLI) --experiment embedded/pairs_rf2_val
CMD_distill_instaflow = $(TIMED) distill_instaflow -- $(CLI) --experiment embedded/distill
CMD_distill_direct = $(TIMED) distill_direct -- $(CLI) --experiment embedded/distill_direct
CMD_distill_direct_rfinit = $(TIMED) distill_direct_rfinit -- $(CLI) --experiment embedded/distill_direct_rfinit
CMD_eval = $(PY) -m instaflow.tools.evaluate --out runs/embedded/results --timings runs/embedded/timings --bf16 --straightness-n 128

$(PAIRS)/teacher/.done: | data-chain
	$(CMD_pairs_teacher) && touch $@
$(PAIRS)/teacher_val/.done: | data-chain
	$(CMD_pairs_teacher_val) && touch $@
$(MODELS)/rf2/model_index.json: $(PAIRS)/teacher/.done $(PAIRS)/teacher_val/.done
	$(CMD_reflow)
$(PAIRS)/rf2/.done: $(MODELS)/rf2/model_index.json
	$(CMD_pairs_rf2) && touch $@
$(PAIRS)/rf2_val/.done: $(MODELS)/rf2/model_index.json
	$(CMD_pairs_rf2_val) && touch $@
$(MODELS)/instaflow/model_index.json: $(PAIRS)/rf2/.done $(PAIRS)/rf2_val/.done
	$(CMD_distill_instaflow)
$(MODELS)/direct/model_index.json: $(PAIRS)/teacher/.done $(PAIRS)/teacher_val/.done
	$(CMD_distill_direct)
$(MODELS)/direct_rfinit/model_index.json: $(PAIRS)/teacher/.done $(PAIRS)/teacher_val/.done $(MODELS)/rf2/model_index.json
	$(CMD_distill_direct_rfinit)

gen-pairs: $(PAIRS)/teacher/.done ## stage 1: teacher ODE couplings (25-step DPM-Solver++, w=3) for train prompts
train-2rf: $(MODELS)/rf2/model_index.json ## stage 2: reflow from the teacher's weights -> the 2-RF
train-distill: $(MODELS)/instaflow/model_index.json $(MODELS)/direct/model_index.json $(MODELS)/direct_rfinit/model_index.json ## stage 3: 2-RF couplings, one-step InstaFlow, direct distillation and its control
eval: $(VENV)/.installed ## evaluate every model on the test protocol; writes runs/embedded/results/results.{md,json}
	$(CMD_eval)

report: $(VENV)/.installed ## after make train-reflow: write results/embedded.{md,json} (the committed record of the run)
	$(PY) -m instaflow.tools.report --run runs/embedded --out results/embedded $(if $(value NOTES),--notes "$$MK_NOTES")

# make generate MODEL=runs/embedded/models/instaflow STEPS=1 PROMPT="a big red circle on the left on a white background"
MODEL ?= runs/embedded/models/instaflow
STEPS ?= 1
W ?= 1.0
PROMPT ?= a large red circle in the center on a white background
generate: $(VENV)/.installed ## PNGs and a captioned grid for PROMPT from MODEL (STEPS, W=guidance) into runs/generate/
	$(PY) -m instaflow.tools.generate --model "$$MK_MODEL" --steps "$$MK_STEPS" --guidance "$$MK_W" --prompt "$$MK_PROMPT" \
	  --out runs/generate

# make demo [MODEL=runs/export/instaflow] [TEACHER=assets/embedded-sd] [PORT=7860]
TEACHER ?= assets/embedded-sd
PORT ?= 7860
demo: $(VENV)/.installed ## live demo (Gradio, http://127.0.0.1:7860, PORT=..): MODEL's image follows the prompt as you type; seed, w, steps, TEACHER's image beside it
	$(PY) -m instaflow.tools.demo --model "$$MK_MODEL" --teacher "$$MK_TEACHER" --port "$$MK_PORT"

# make export MODEL=runs/embedded/models/instaflow OUT=runs/export/instaflow
# OUT defaults to runs/export/<MODEL's folder name> (in the recipe: MODEL's value is never expanded by make)
OUT ?=
export: $(VENV)/.installed ## MODEL (2-RF or one-step) as a diffusers folder in OUT, loadable without this project; checks it reloads
	$(PY) -m instaflow.tools.export --model "$$MK_MODEL" --out "$${MK_OUT:-runs/export/$$(basename -- "$$MK_MODEL")}"

ablation: $(VENV)/.installed ## the embedded evidence (docs/ablation.md): resumable stages, < 4 h on 2 cores -> results/ablation.{md,json} + 3 figures
	$(PY) -m studies.ablation.run --root runs/ablation --results results/ablation

# make run EXP=embedded/distill_direct [ARGS="--trainer.max_steps 10"]
# ARGS: more command-line arguments for the CLI, split at whitespace; nothing in it is expanded or run by the
# shell (no quoting, globbing or $(...)): write a value with spaces as JSON without spaces, or in a -c file
EXP ?=
ARGS ?=
run: $(VENV)/.installed ## any experiment by name (EXP=embedded/reflow): its -c chain and subcommand from its header
	$(if $(value EXP),,$(error give the experiment: make run EXP=<folder>/<name>, e.g. EXP=embedded/distill_direct))
	set -f; $(CLI) --experiment "$$MK_EXP" $$MK_ARGS

# --- the same chain on a cluster (instaflow/tools/launch.py, README "Clusters"): with NODES or PARTITION set,
# train-reflow submits ONE SLURM job whose script runs the stage commands (the CMD_* variables of the recipes
# above) in order, each skipped when its output exists, so a requeued job
# resumes; DRY_RUN=1 prints the script, REQUEUE=0 turns requeue off. LAUNCHER=torchrun RDZV=host:port runs them through torchrun instead
# (run it on every node with NODE_RANK set). Nothing is rescaled: the global batch is batch_size x NODES x GPUS.
NODES ?=
PARTITION ?=
GPUS_PER_NODE ?= 1
TIME_LIMIT ?=
JOB_NAME ?= instaflow
SLURM_DIR ?= runs/slurm
LAUNCHER ?= slurm
RDZV ?= localhost:29500
CHAIN_STAGES = \
  --stage data - $(call shq,$(CMD_data)) \
  --stage pairs_teacher $(PAIRS)/teacher/.done $(call shq,$(CMD_pairs_teacher)) \
  --stage pairs_teacher_val $(PAIRS)/teacher_val/.done $(call shq,$(CMD_pairs_teacher_val)) \
  --stage reflow $(MODELS)/rf2/model_index.json $(call shq,$(CMD_reflow)) \
  --stage pairs_rf2 $(PAIRS)/rf2/.done $(call shq,$(CMD_pairs_rf2)) \
  --stage pairs_rf2_val $(PAIRS)/rf2_val/.done $(call shq,$(CMD_pairs_rf2_val)) \
  --stage distill_instaflow $(MODELS)/instaflow/model_index.json $(call shq,$(CMD_distill_instaflow)) \
  --stage distill_direct $(MODELS)/direct/model_index.json $(call shq,$(CMD_distill_direct)) \
  --stage distill_direct_rfinit $(MODELS)/direct_rfinit/model_index.json $(call shq,$(CMD_distill_direct_rfinit)) \
  --stage eval - $(call shq,$(CMD_eval))
WORLD_ARGS = --nodes "$${MK_NODES:-1}" --gpus-per-node "$$MK_GPUS_PER_NODE" $(if $(filter-out 0,$(value DRY_RUN)),--dry-run) \
  $(if $(filter torchrun,$(value LAUNCHER)),--rdzv-endpoint "$$MK_RDZV",--job-name "$$MK_JOB_NAME" --dir "$$MK_SLURM_DIR" \
  $(if $(value PARTITION),--partition "$$MK_PARTITION") $(if $(value TIME_LIMIT),--time "$$MK_TIME_LIMIT") \
  $(if $(filter 0,$(value REQUEUE)),--no-requeue))

ifeq ($(value NODES)$(value PARTITION),)
train-reflow: train-distill ## the whole InstaFlow chain, then the results table (NODES=.. GPUS_PER_NODE=.. PARTITION=..: one SLURM job)
	$(MAKE) eval
else
train-reflow: $(VENV)/.installed
	$(PY) -m instaflow.tools.launch "$$MK_LAUNCHER" $(WORLD_ARGS) $(CHAIN_STAGES)
endif

# make sweep SWEEP=experiments/sweeps/reflow_lr.yaml [WORKERS=N] [NODES=.. GPUS_PER_NODE=.. PARTITION=.. [DRY_RUN=1]]
SWEEP_SLURM = $(if $(value NODES)$(value PARTITION),--slurm --nodes "$${MK_NODES:-1}" --gpus-per-node "$$MK_GPUS_PER_NODE" \
  --dir "$$MK_SLURM_DIR" $(if $(value PARTITION),--partition "$$MK_PARTITION") $(if $(value TIME_LIMIT),--time "$$MK_TIME_LIMIT"))
sweep: $(VENV)/.installed ## Optuna study of SWEEP=<file>: WORKERS=N processes here (default 1), or a SLURM array of workers with NODES/PARTITION; resumes
	$(if $(value SWEEP),,$(error give the sweep file: make sweep SWEEP=experiments/sweeps/<name>.yaml))
	$(PY) -m instaflow.tools.sweep "$$MK_SWEEP" $(if $(value WORKERS),--workers "$$MK_WORKERS") $(SWEEP_SLURM) \
	  $(if $(filter-out 0,$(value DRY_RUN)),--dry-run)

sweep-report: $(VENV)/.installed ## SWEEP=<file>: its study's ranked table and plots (history, importances, curves) in its save_dir
	$(if $(value SWEEP),,$(error give the sweep file: make sweep-report SWEEP=experiments/sweeps/<name>.yaml))
	$(PY) -m instaflow.tools.sweep "$$MK_SWEEP" --report

# the demo's browser test needs Chromium: `browser` installs it (apt-get as root or with sudo -n) or stops with the
# command; BROWSER=0 deselects that one test instead (it is then not run, not passed)
BROWSER_STEP = $(if $(filter 0,$(value BROWSER)),,browser)
NO_BROWSER = $(if $(filter 0,$(value BROWSER)),--deselect tests/tools/test_demo.py::test_demo_in_a_real_browser)
browser: ## Chromium + ChromeDriver for the demo's browser test (apt-get as root or with sudo -n; otherwise the command)
	bash .ci/browser

test: $(VENV)/.installed $(BROWSER_STEP) ## fast offline tests (a few minutes on 2 cores); installs Chromium first (BROWSER=0: no browser test)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and (not rehearsal or rehearsal_quick)" $(NO_BROWSER)

rehearsal: $(VENV)/.installed ## faults injected into 4-rank CPU runs of the sd15 recipe, one line per scenario (docs/rehearsal.md)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m rehearsal tests/rehearsal

test-full: $(VENV)/.installed $(BROWSER_STEP) ## all tests, including the slow ones
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(NO_BROWSER)

bench: $(VENV)/.installed ## roofline: the machine's measured peak FLOP/s and each stage's fraction of it -> benchmarks/results_roofline.json (python -m benchmarks.bench_cpu: plain throughputs)
	$(PY) -m benchmarks.roofline

memory: $(VENV)/.installed ## GiB per GPU of weights, grads and AdamW per family (SD 1.5, SDXL, SD3, Flux): DDP, FSDP2 over GPUS=8, LoRA
	$(PY) -m instaflow.tools.memory --gpus "$${MK_GPUS:-8}"

bench-gpu: $(VENV)/.installed ## SD-1.5-sized reflow step time/memory/MFU (bf16, FSDP2), couplings/s, one-step latency; needs CUDA
	$(PY) -m benchmarks.bench_gpu

tensorboard: $(VENV)/.installed ## TensorBoard over every run in runs/
	$(VENV)/bin/tensorboard --logdir runs

clean: ## delete generated data and runs (keeps committed assets/)
	rm -rf runs

# make would export a command-line value under its own name, expanding $(shell ...) in it: it goes as MK_<NAME>
# only (here, at the end: an earlier unexport would define the names before their ?= defaults)
unexport $(USER_VARS)
