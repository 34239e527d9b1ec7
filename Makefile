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
# Demo-size synthetic set: 20% malignant so each of 5 test folds holds 10 malignant nodules
# (the issue's benchmark set is 192 nodules x ~90 frames x 256 px, 9% malignant: `usnodule synth` defaults).
# Many short sweeps rather than few long ones (250 x 12 = the same ~3,000 frames as 100 x 30, so the same
# compute): labels are per nodule; with 12 malignant training nodules the fold-0 ViT was at chance (val
# AUROC 0.42), with 40 (300 x 12) 0.67-0.70, and 50-nodule test folds make the AUROCs less noisy.
SYNTH_ARGS ?= --nodules 250 --frames 12 --size 128 --cases 40 --prevalence 0.2 --seed $(SEED)

# Attention-head variants trained per fold: STACT-Time Table 4 (add `joint`, the joint-fusion backbone of
# Table 3, with HEAD_VARIANTS="stact vit_self seg_self joint").
HEAD_VARIANTS ?= stact vit_self seg_self
BASELINES ?= tirads,avepool,cinetrans

.PHONY: FORCE help venv data splits vit seg masks maskcnn embeddings train-head predictions report demo asycmst \
        test lint bench clean clean-runs

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

# A real DATA directory is used as it is; the synthetic one is generated on demand, and again when
# SYNTH_ARGS change (recorded in $(SYNTH)/.args, rewritten only when different).
$(SYNTH)/stanford/dataset.hdf5 $(SYNTH)/paired/manifest.csv &: $(SYNTH)/.args | $(STAMP)
	$(USNODULE) synth --out $(SYNTH) $(SYNTH_ARGS) --preview

$(SYNTH)/.args: FORCE
	@mkdir -p $(@D); echo '$(SYNTH_ARGS)' | cmp -s - $@ || echo '$(SYNTH_ARGS)' > $@

FORCE:

splits: $(SPLITS) $(PAIRED)/splits.json ## K folds grouped by patient, stratified by label (FOLDS=5)

$(SPLITS): $(H5) | $(STAMP)
	$(USNODULE) split $(H5) -k $(FOLDS) --seed $(SEED) --out $@

$(PAIRED)/splits.json: $(PAIRED)/manifest.csv | $(STAMP)
	$(USNODULE) split $< -k $(FOLDS) --seed $(SEED) --out $@

# ---------------------------------------------------------------------------------------------- STACT-Time
# Every stage of fold k fits only on fold k's training nodules (splits.json); outputs live in runs/<EXP>/fold<k>/.
# TRAINER_ARGS reaches every fit, e.g. TRAINER_ARGS="--trainer.devices=4 --trainer.strategy=ddp --trainer.precision=bf16-mixed"
TRAINER_ARGS ?=
REPORT_ARGS ?=
FIT_ARGS = --exp $(EXP) --data.init_args.splits=$(SPLITS) --data.init_args.fold=$* $(TRAINER_ARGS)

vit: $(call PER_FOLD,vit.ckpt) ## stage 1: fine-tune the ViT on 3-stack ROI crops, every fold
seg: $(call PER_FOLD,seg.ckpt) ## stage 2: fine-tune MSU-Net on frames + masks, every fold
masks: $(call PER_FOLD,masks.h5) ## stage 2b: predicted masks for every frame, every fold
maskcnn: $(call PER_FOLD,maskcnn.ckpt) ## stage 3: mask CNN on 3-stacks of predicted masks, every fold
embeddings: $(call PER_FOLD,embeddings.h5) ## stage 4: image + segmentation embeddings per nodule to HDF5
train-head: $(foreach v,$(HEAD_VARIANTS),$(call PER_FOLD,head_$(v).ckpt)) ## stage 5: attention heads (HEAD_VARIANTS)

$(RUNS)/fold%/vit.ckpt: $(CONF)/vit.yaml $(SPLITS) | $(STAMP)
	$(FIT) -c $< $(FIT_ARGS) --data.init_args.h5=$(H5) --trainer.default_root_dir=$(@D)/vit --ckpt_out=$@

$(RUNS)/fold%/seg.ckpt: $(CONF)/seg.yaml $(SPLITS) | $(STAMP)
	$(FIT) -c $< $(FIT_ARGS) --data.init_args.h5=$(H5) --trainer.default_root_dir=$(@D)/seg --ckpt_out=$@

$(RUNS)/fold%/masks.h5: $(RUNS)/fold%/seg.ckpt | $(STAMP)
	$(USNODULE) masks --cine $(H5) --seg $< --out $@

$(RUNS)/fold%/maskcnn.ckpt: $(CONF)/maskcnn.yaml $(RUNS)/fold%/masks.h5 | $(STAMP)
	$(FIT) -c $< $(FIT_ARGS) --data.init_args.h5=$(H5) --data.init_args.masks_h5=$(@D)/masks.h5 \
	  --trainer.default_root_dir=$(@D)/maskcnn --ckpt_out=$@

$(RUNS)/fold%/embeddings.h5: $(RUNS)/fold%/vit.ckpt $(RUNS)/fold%/maskcnn.ckpt $(RUNS)/fold%/masks.h5 | $(STAMP)
	$(USNODULE) embeddings --cine $(H5) --masks $(@D)/masks.h5 --vit $(@D)/vit.ckpt --maskcnn $(@D)/maskcnn.ckpt \
	  --splits $(SPLITS) --fold $* --out $@

define HEAD_RULE
$$(RUNS)/fold%/head_$(1).ckpt: $$(CONF)/head.yaml $$(RUNS)/fold%/embeddings.h5 | $$(STAMP)
	$$(FIT) -c $$< $$(FIT_ARGS) --data.init_args.path=$$(@D)/embeddings.h5 --model.init_args.variant=$(1) \
	  --trainer.default_root_dir=$$(@D)/head_$(1) --ckpt_out=$$@
endef
$(foreach v,$(HEAD_VARIANTS),$(eval $(call HEAD_RULE,$(v))))

predictions: $(RUNS)/predictions.done ## per-fold test predictions of every head and baseline
$(RUNS)/predictions.done: $(call PER_FOLD,embeddings.h5) $(foreach v,$(HEAD_VARIANTS),$(call PER_FOLD,head_$(v).ckpt))
	$(USNODULE) baselines --cine $(H5) --splits $(SPLITS) --runs $(RUNS) --methods $(BASELINES) --seed $(SEED) \
	  $(foreach v,$(HEAD_VARIANTS),--head $(v)={runs}/fold{fold}/head_$(v).ckpt)
	touch $@

report: $(REPORT)/results.md ## Table-2-style report: results.md/.csv, ROC curves, per-nodule predictions
$(REPORT)/results.md: $(RUNS)/predictions.done
	$(USNODULE) report --runs $(RUNS) --out $(REPORT) --exp $(EXP) $(REPORT_ARGS)

# The demo runs independent folds two at a time (one torch thread each): most of a CPU-size fit is Python
# start-up, which a second core hides.
JOBS ?= 2
demo: | $(STAMP) ## the whole STACT-Time chain on synthetic data at CPU size, then the result table
	@start=$$(date +%s); \
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j$(JOBS) --output-sync=target $(REPORT)/results.md && \
	cat $(REPORT)/results.md && echo && echo "demo: $$(( $$(date +%s) - start )) s (EXP=$(EXP), FOLDS=$(FOLDS), JOBS=$(JOBS))"

# ---------------------------------------------------------------------------------------------- AsyCMST
# End to end on the paired BUS/CEUS set, per fold of $(PAIRED)/splits.json (grouped by patient); each fold is
# fitted, then tested on its held-out part (metrics printed, roc_test.png beside the logs).
# Paper size: make asycmst CONF=conf EXP=paper PAIRED=/data/bus_ceus
ASYCMST_CONF ?= $(CONF)/asycmst.yaml
ASYCMST_ARGS = --exp $(EXP) --data.init_args.manifest=$(PAIRED)/manifest.csv \
  --data.init_args.splits=$(PAIRED)/splits.json --data.init_args.fold=$* --trainer.default_root_dir=$(@D)/asycmst \
  $(TRAINER_ARGS)

asycmst: $(call PER_FOLD,asycmst.ckpt) ## AsyCMST on the paired BUS/CEUS set, every fold (ASYCMST_CONF=...)

$(RUNS)/fold%/asycmst.ckpt: $(ASYCMST_CONF) $(PAIRED)/splits.json | $(STAMP)
	$(FIT) -c $(ASYCMST_CONF) $(ASYCMST_ARGS) --ckpt_out=$@.tmp.ckpt
	$(VENV)/bin/lightning test -c $(ASYCMST_CONF) $(ASYCMST_ARGS) --ckpt_path=$@.tmp.ckpt
	mv $@.tmp.ckpt $@

# ---------------------------------------------------------------------------------------------- checks
test: $(STAMP) ## run the whole test suite
	$(PY) -m pytest

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check stages datamodules lightning_modules tests benchmarks

clean-runs: ## remove runs/ and reports/ of EXP
	rm -rf $(RUNS) $(REPORT)

clean: ## remove generated data, runs, reports (keeps .venv)
	rm -rf data/synth runs reports lightning_logs wandb
