# usnodule — every step of the pipeline as a make target.  `make help` lists them.
#
# Paths are make variables, so the same chain runs on the synthetic set (default) or a real one:
#   make demo                                   # synthetic data, CPU-size configs, all folds
#   make train-head DATA=/data/stanford EXP=paper CONF=conf
# Targets are files with their inputs as prerequisites: rerunning after nothing changed does nothing,
# and editing a config reruns what depends on it.

SHELL := /bin/bash
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
USNODULE := $(VENV)/bin/usnodule
FIT      := $(VENV)/bin/lightning fit
STAMP    := $(VENV)/.installed

EXP      ?= demo
CONF     ?= conf/demo
SYNTH    ?= data/synth
DATA     ?= $(SYNTH)/stanford
PAIRED   ?= $(SYNTH)/paired
H5       := $(DATA)/dataset.hdf5
SPLITS   ?= $(DATA)/splits.json
FOLDS    ?= 5
SEED     ?= 0
RUNS     := runs/$(EXP)
REPORT   := reports/$(EXP)
FOLD_IDS := $(shell seq 0 $$(( $(FOLDS) - 1 )))
PER_FOLD  = $(foreach k,$(FOLD_IDS),$(RUNS)/fold$(k)/$(1))
# Synthetic set size (the issue's benchmark set is 192 nodules x ~90 frames x 256 px).
SYNTH_ARGS ?= --nodules 60 --frames 30 --size 128 --cases 40 --seed $(SEED)

.PHONY: help venv data splits demo test lint bench clean clean-runs

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv and install usnodule with its dev extras

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# ---------------------------------------------------------------------------------------------- data
data: $(SYNTH)/stanford/dataset.hdf5 ## generate the synthetic Stanford-layout and paired BUS/CEUS sets (+ preview.png)

# A real DATA directory is used as it is; the synthetic one is generated on demand.
$(SYNTH)/stanford/dataset.hdf5 $(SYNTH)/paired/manifest.csv &: | $(STAMP)
	$(USNODULE) synth --out $(SYNTH) $(SYNTH_ARGS) --preview

splits: $(SPLITS) $(PAIRED)/splits.json ## K folds grouped by patient, stratified by label (FOLDS=5)

$(SPLITS): $(H5) | $(STAMP)
	$(USNODULE) split $(H5) -k $(FOLDS) --seed $(SEED) --out $@

$(PAIRED)/splits.json: $(PAIRED)/manifest.csv | $(STAMP)
	$(USNODULE) split $< -k $(FOLDS) --seed $(SEED) --out $@

# ---------------------------------------------------------------------------------------------- checks
test: $(STAMP) ## run the whole test suite
	$(PY) -m pytest

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check stages datamodules lightning_modules tests benchmarks

clean-runs: ## remove runs/ and reports/ of EXP
	rm -rf $(RUNS) $(REPORT)

clean: ## remove generated data, runs, reports (keeps .venv)
	rm -rf data/synth runs reports lightning_logs wandb
