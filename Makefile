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
# Demo-size synthetic set.  Stanford layout: 400 sweeps of ~9 frames (25% malignant, so each of 5 test folds
# holds 20 malignant nodules; more nodules of fewer frames taught the image encoder more than long sweeps,
# BENCHMARKS.md "Demo recipe").  Paired BUS/CEUS: 2,000 short 64 px clips (45% malignant like the AsyCMST
# thyroid set): AsyCMST learns from many fresh clips, not from repeats of few.
# Still images (two-stage, CSASN): 600 single frames at 96 px with carcinoma subtypes (40% malignant; FTC and
# MTC 5% each, so every test fold holds ~6 of each rare subtype).
# (The issue's benchmark set is 192 nodules x ~90 frames x 256 px, 9% malignant: `usnodule synth` defaults.)
SYNTH_ARGS ?= --nodules 400 --frames 9 --size 128 --prevalence 0.25 \
  --cases 2000 --paired-frames 12 --paired-size 64 --paired-prevalence 0.45 \
  --stills 600 --stills-size 96 --seed $(SEED)
# Render processes: the same bytes for any number, so not part of SYNTH_ARGS (a change there regenerates the sets).
SYNTH_WORKERS ?= 2

# Attention-head variants trained per fold: STACT-Time Table 4 (add `joint`, the joint-fusion backbone of
# Table 3, with HEAD_VARIANTS="stact vit_self seg_self joint").
HEAD_VARIANTS ?= stact vit_self seg_self
BASELINES ?= tirads,avepool,cinetrans
comma := ,
# CineCNN-Trans is a fit of its own (`make cinetrans`), needed by `predictions` only when it is a baseline.
CINETRANS = $(if $(filter cinetrans,$(subst $(comma), ,$(BASELINES))),$(call PER_FOLD,head_cine_trans.ckpt))

.PHONY: FORCE help venv data splits vit seg masks maskcnn embeddings train-head cinetrans predictions report demo \
        asycmst test lint bench clean clean-runs

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv and install usnodule with its dev extras

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# ---------------------------------------------------------------------------------------------- data
# Quiet steps: each recipe runs through `python -m stages.step` (stdlib only, adds ~20 ms), which appends
# the command's output to $(RUNS)/logs/<step>[_fold<k>].log and prints one line when it ends (step, fold,
# seconds, the key metric of the command's `RESULT k=v` line); a failing step prints its last 20 log lines and
# the log path, and exits with the command's status.  `make -n` still shows every command.
# VERBOSE=1: no runner, commands echoed, their output on the terminal (progress bars included).
VERBOSE ?=
Q     := $(if $(filter-out 0 no false,$(VERBOSE)),,@)
STEP   = $(if $(Q),$(PY) -m stages.step --log $(RUNS)/logs/$(1)$(if $(2),_fold$(2)).log --name $(1)$(if $(2), --fold $(2)) --)

data: $(SYNTH)/preview.png ## generate the synthetic Stanford-layout, paired BUS/CEUS and still-image sets (+ preview.png)

# A real DATA directory is used as it is; the synthetic one is generated on demand, and again when
# SYNTH_ARGS change (recorded in $(SYNTH)/.args, rewritten only when different) or the generator's code does.
# One step per set (`synth --only`, the same bytes as one run): the cine chain starts while the paired clips
# are drawn, and the still images are drawn only for the targets that read them.
SYNTH_INPUTS := $(SYNTH)/.args $(wildcard datamodules/synth/*.py)
$(SYNTH)/stanford/dataset.hdf5: $(SYNTH_INPUTS) | $(STAMP)
	$(Q)$(call STEP,data_stanford) $(USNODULE) synth --out $(SYNTH) $(SYNTH_ARGS) --only stanford \
	  --workers $(SYNTH_WORKERS)
$(SYNTH)/paired/manifest.csv: $(SYNTH_INPUTS) | $(STAMP)
	$(Q)$(call STEP,data_paired) $(USNODULE) synth --out $(SYNTH) $(SYNTH_ARGS) --only paired
$(SYNTH)/stills/manifest.csv: $(SYNTH_INPUTS) | $(STAMP)
	$(Q)$(call STEP,data_stills) $(USNODULE) synth --out $(SYNTH) $(SYNTH_ARGS) --only stills
$(SYNTH)/preview.png: $(SYNTH)/stanford/dataset.hdf5 $(SYNTH)/paired/manifest.csv $(SYNTH)/stills/manifest.csv
	$(Q)$(call STEP,preview) $(USNODULE) synth --out $(SYNTH) --only preview

$(SYNTH)/.args: FORCE
	@mkdir -p $(@D); echo '$(SYNTH_ARGS)' | cmp -s - $@ || echo '$(SYNTH_ARGS)' > $@

FORCE:

splits: $(SPLITS) $(PAIRED)/splits.json ## K folds grouped by patient, stratified by label (FOLDS=5)

$(SPLITS): $(H5) | $(STAMP)
	$(Q)$(call STEP,splits) $(USNODULE) split $(H5) -k $(FOLDS) --seed $(SEED) --out $@

$(PAIRED)/splits.json: $(PAIRED)/manifest.csv | $(STAMP)
	$(Q)$(call STEP,splits_paired) $(USNODULE) split $< -k $(FOLDS) --seed $(SEED) --out $@

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
	$(Q)$(call STEP,vit,$*) $(FIT) -c $< $(FIT_ARGS) --data.init_args.h5=$(H5) --trainer.default_root_dir=$(@D)/vit \
	  --ckpt_out=$@

$(RUNS)/fold%/seg.ckpt: $(CONF)/seg.yaml $(SPLITS) | $(STAMP)
	$(Q)$(call STEP,seg,$*) $(FIT) -c $< $(FIT_ARGS) --data.init_args.h5=$(H5) --trainer.default_root_dir=$(@D)/seg \
	  --ckpt_out=$@

$(RUNS)/fold%/masks.h5: $(RUNS)/fold%/seg.ckpt | $(STAMP)
	$(Q)$(call STEP,masks,$*) $(USNODULE) masks --cine $(H5) --seg $< --out $@

$(RUNS)/fold%/maskcnn.ckpt: $(CONF)/maskcnn.yaml $(RUNS)/fold%/masks.h5 | $(STAMP)
	$(Q)$(call STEP,maskcnn,$*) $(FIT) -c $< $(FIT_ARGS) --data.init_args.h5=$(H5) \
	  --data.init_args.masks_h5=$(@D)/masks.h5 --trainer.default_root_dir=$(@D)/maskcnn --ckpt_out=$@

# Image crops of the embeddings: ROI=predicted (default; the deployable protocol, what `usnodule predict` does on a
# new clip: boxes around the fold's MSU-Net masks) or ROI=annotated (the paper's protocol: the radiologists'
# masks, which a new clip does not have).  The report says which.  Recorded in $(RUNS)/.roi (rewritten when make
# reads this file and ROI differs; not a FORCE rule, which `make -n` would take as changed), so changing ROI
# re-exports the embeddings and refits what follows (the encoders are not refitted).
ROI ?= predicted
$(if $(filter predicted annotated,$(ROI)),,$(error ROI must be predicted or annotated, not '$(ROI)'))
$(shell mkdir -p $(RUNS) && { echo '$(ROI)' | cmp -s - $(RUNS)/.roi || echo '$(ROI)' > $(RUNS)/.roi; })

# Cross-fitting (opt-in: CROSSFIT=1; not the default, BENCHMARKS.md "Cross-fitting": it did not help at demo size):
# each fold's training part is halved (A/B: label-stratified, patient-grouped, by SEED; fold<k>/crossfit/halves.json
# and splits_A/B.json), a ViT and a mask CNN are fitted per half with the same configs, and the embeddings put each
# training nodule through the other half's encoders (validation/test nodules through both; the heads average).
# Recorded in $(RUNS)/.crossfit (written once CROSSFIT was set), so switching re-exports the embeddings.
CROSSFIT ?= 0
CF := $(filter-out 0 no false,$(CROSSFIT))
$(shell test -z '$(CF)' -a ! -f $(RUNS)/.crossfit || { echo '$(if $(CF),cross-fitted,in-sample)' | \
  cmp -s - $(RUNS)/.crossfit || echo '$(if $(CF),cross-fitted,in-sample)' > $(RUNS)/.crossfit; })
CF_HALF = $(RUNS)/fold%/crossfit/vit_$(1).ckpt $(RUNS)/fold%/crossfit/maskcnn_$(1).ckpt
EMB_IN  = $(if $(CF),$(call CF_HALF,A) $(call CF_HALF,B),$(RUNS)/fold%/vit.ckpt $(RUNS)/fold%/maskcnn.ckpt)
EMB_ENC = $(if $(CF),--crossfit $(@D)/crossfit,--vit $(@D)/vit.ckpt --maskcnn $(@D)/maskcnn.ckpt)

$(RUNS)/fold%/embeddings.h5: $(EMB_IN) $(RUNS)/fold%/masks.h5 $(RUNS)/.roi $(wildcard $(RUNS)/.crossfit) | $(STAMP)
	$(Q)$(call STEP,embeddings,$*) $(USNODULE) embeddings --cine $(H5) --masks $(@D)/masks.h5 $(EMB_ENC) \
	  --splits $(SPLITS) --fold $* --boxes $(ROI) --out $@

$(RUNS)/fold%/crossfit/halves.json: $(SPLITS) | $(STAMP)
	$(Q)$(call STEP,crossfit_halves,$*) $(USNODULE) crossfit-halves --cine $(H5) --splits $(SPLITS) --fold $* \
	  --seed $(SEED) --out $(@D)
CF_FIT_ARGS = --exp $(EXP) --data.init_args.splits=$(@D)/splits_$(1).json --data.init_args.fold=$* $(TRAINER_ARGS)
define CF_RULES
$$(RUNS)/fold%/crossfit/vit_$(1).ckpt: $$(CONF)/vit.yaml $$(RUNS)/fold%/crossfit/halves.json | $$(STAMP)
	$$(Q)$$(call STEP,vit_$(1),$$*) $$(FIT) -c $$< $$(call CF_FIT_ARGS,$(1)) --data.init_args.h5=$$(H5) \
	  --trainer.default_root_dir=$$(@D)/vit_$(1) --ckpt_out=$$@
$$(RUNS)/fold%/crossfit/maskcnn_$(1).ckpt: $$(CONF)/maskcnn.yaml $$(RUNS)/fold%/crossfit/halves.json \
  $$(RUNS)/fold%/masks.h5 | $$(STAMP)
	$$(Q)$$(call STEP,maskcnn_$(1),$$*) $$(FIT) -c $$< $$(call CF_FIT_ARGS,$(1)) --data.init_args.h5=$$(H5) \
	  --data.init_args.masks_h5=$$(RUNS)/fold$$*/masks.h5 \
	  --trainer.default_root_dir=$$(@D)/maskcnn_$(1) --ckpt_out=$$@
endef
$(foreach h,A B,$(eval $(call CF_RULES,$(h))))
.SECONDARY: $(foreach f,halves.json vit_A.ckpt vit_B.ckpt maskcnn_A.ckpt maskcnn_B.ckpt,$(call PER_FOLD,crossfit/$(f)))

define HEAD_RULE
$$(RUNS)/fold%/head_$(1).ckpt: $$(CONF)/head.yaml $$(RUNS)/fold%/embeddings.h5 | $$(STAMP)
	$$(Q)$$(call STEP,head_$(1),$$*) $$(FIT) -c $$< $$(FIT_ARGS) --data.init_args.path=$$(@D)/embeddings.h5 \
	  --model.init_args.variant=$(1) --trainer.default_root_dir=$$(@D)/head_$(1) --ckpt_out=$$@
endef
$(foreach v,$(HEAD_VARIANTS),$(eval $(call HEAD_RULE,$(v))))

# CineCNN-Trans (Table 2 baseline): the head stage's cine_trans variant with its own recipe (conf/cinetrans.yaml:
# its schedule, no validation, last epoch kept), seeded SEED + fold as when `usnodule baselines` trained it.
cinetrans: $(call PER_FOLD,head_cine_trans.ckpt) ## CineCNN-Trans baseline on the image embeddings, every fold
$(RUNS)/fold%/head_cine_trans.ckpt: $(CONF)/cinetrans.yaml $(RUNS)/fold%/embeddings.h5 | $(STAMP)
	$(Q)$(call STEP,head_cine_trans,$*) $(FIT) -c $< $(FIT_ARGS) --data.init_args.path=$(@D)/embeddings.h5 \
	  --seed_everything=$(shell echo $$(( $(SEED) + $* ))) --trainer.default_root_dir=$(@D)/head_cine_trans \
	  --ckpt_out=$@

# Predicts only: every network here was fitted by `lightning fit` above.  One step per fold (they run in parallel
# under -j; the TI-RADS forest of fold k sees only fold k's training nodules either way).
predictions: $(RUNS)/predictions.done ## per-fold test predictions of every head and baseline
$(RUNS)/predictions.done: $(call PER_FOLD,predictions.done)
	$(Q)touch $@
$(RUNS)/fold%/predictions.done: $(RUNS)/fold%/embeddings.h5 $(foreach v,$(HEAD_VARIANTS),$(RUNS)/fold%/head_$(v).ckpt) \
  $(if $(CINETRANS),$(RUNS)/fold%/head_cine_trans.ckpt)
	$(Q)$(call STEP,predictions,$*) $(USNODULE) baselines --cine $(H5) --splits $(SPLITS) --runs $(RUNS) \
	  --folds $* --methods $(BASELINES) --seed $(SEED) --cinetrans {runs}/fold{fold}/head_cine_trans.ckpt \
	  $(foreach v,$(HEAD_VARIANTS),--head $(v)={runs}/fold{fold}/head_$(v).ckpt)
	$(Q)touch $@

report: $(REPORT)/results.md ## Table-2-style report: results.md/.csv, ROC curves, per-nodule predictions
	@echo && cat $(REPORT)/results.md
# Synthetic sets carry truth.csv (the generator's clean risk): the report adds the Bayes-ceiling and TI-RADS-oracle
# rows from it; a real data set has none (tested when the recipe runs, since the data may not exist yet).
TRUTH = $$(test -f $(1)/truth.csv && echo --truth $(1)/truth.csv)
$(REPORT)/results.md: $(RUNS)/predictions.done
	$(Q)$(call STEP,report) $(USNODULE) report --runs $(RUNS) --out $(REPORT) --exp $(EXP) --title STACT-Time \
	  $(call TRUTH,$(DATA)) $(REPORT_ARGS)

# The demo runs independent folds two at a time (one torch thread each).  Its ~50 steps are forked from one warm
# Python that imported torch + Lightning once (`stages.warm`: ~10 s saved per step on the 2-core VM; WARM=0
# starts each step cold).  W&B is off in the demo (its start-up costs seconds per fit): `make demo
# DEMO_WANDB=offline` keeps the offline runs.  Any target can run warm: `python -m stages.warm -- make train-head`.
JOBS ?= 2
WARM ?= 1
DEMO_WANDB ?= disabled
WARM_RUN = $(if $(filter-out 0 no false,$(WARM)),$(PY) -m stages.warm --log $(RUNS)/logs/warm.log --)
demo: | $(STAMP) ## both chains (STACT-Time, AsyCMST) on synthetic data at CPU size, then their result tables
	@start=$$(date +%s); \
	WANDB_MODE=$${WANDB_MODE:-$(DEMO_WANDB)} OMP_NUM_THREADS=1 $(WARM_RUN) $(MAKE) --no-print-directory -j$(JOBS) \
	  --output-sync=target report asycmst-report && \
	echo && echo "demo: $$(( $$(date +%s) - start )) s (EXP=$(EXP), FOLDS=$(FOLDS), JOBS=$(JOBS); logs in $(RUNS)/logs/)"

# ---------------------------------------------------------------------------------------------- AsyCMST
# End to end on the paired BUS/CEUS set, per fold of $(PAIRED)/splits.json (grouped by patient), one process per
# fold: `lightning fit` with test_after_fit fits, validates and tests the best checkpoint and writes
# $(RUNS)/asycmst/fold<k>/{asycmst.ckpt, predictions_asycmst.csv, val_predictions_asycmst.csv, roc_test.png};
# `make asycmst-report` pools the folds into $(REPORT)/asycmst/results.md (operating thresholds from each fold's
# validation predictions), with the generator's reference rows when $(PAIRED)/truth.csv
# exists (synthetic data).  ASYCMST_METHODS="asycmst asycmst_none" adds the strategy: none comparison
# (cross-modal attention off, same folds and recipe) to the same report.
# Paper size: make asycmst-report CONF=conf EXP=paper PAIRED=/data/bus_ceus
ASYCMST_CONF ?= $(CONF)/asycmst.yaml
ASYCMST_RUNS := $(RUNS)/asycmst
ASYCMST_METHODS ?= asycmst
ASYCMST_ARGS = --exp $(EXP) --data.init_args.manifest=$(PAIRED)/manifest.csv \
  --data.init_args.splits=$(PAIRED)/splits.json --data.init_args.fold=$* --model.init_args.test_after_fit=true \
  $(TRAINER_ARGS)
ASYCMST_PRED = $(foreach m,$(1),$(foreach k,$(FOLD_IDS),$(foreach p,predictions val_predictions,\
  $(ASYCMST_RUNS)/fold$(k)/$(p)_$(m).csv)))

.PHONY: asycmst-none asycmst-report
asycmst: $(call ASYCMST_PRED,asycmst) ## AsyCMST on the paired BUS/CEUS set, every fold: checkpoint + validation and test predictions
asycmst-none: $(call ASYCMST_PRED,asycmst_none) ## the same with strategy: none (no cross-modal attention), every fold
asycmst-report: $(REPORT)/asycmst/results.md ## AsyCMST cross-fold report (ASYCMST_METHODS="asycmst asycmst_none")
	@echo && cat $<

$(ASYCMST_RUNS)/fold%/predictions_asycmst.csv $(ASYCMST_RUNS)/fold%/val_predictions_asycmst.csv \
  $(ASYCMST_RUNS)/fold%/asycmst.ckpt: $(ASYCMST_CONF) \
  $(PAIRED)/splits.json | $(STAMP)
	$(Q)$(call STEP,asycmst,$*) $(FIT) -c $(ASYCMST_CONF) $(ASYCMST_ARGS) --trainer.default_root_dir=$(@D) \
	  --ckpt_out=$(@D)/asycmst.ckpt

# strategy: none writes its predictions beside AsyCMST's (same fold folder), its logs and checkpoints under none/
$(ASYCMST_RUNS)/fold%/predictions_asycmst_none.csv $(ASYCMST_RUNS)/fold%/val_predictions_asycmst_none.csv \
  $(ASYCMST_RUNS)/fold%/asycmst_none.ckpt: $(ASYCMST_CONF) \
  $(PAIRED)/splits.json | $(STAMP)
	$(Q)$(call STEP,asycmst_none,$*) $(FIT) -c $(ASYCMST_CONF) $(ASYCMST_ARGS) --model.init_args.strategy=none \
	  --model.init_args.method=asycmst_none --model.init_args.predictions_dir=$(@D) \
	  --trainer.default_root_dir=$(@D)/none --ckpt_out=$(@D)/asycmst_none.ckpt

$(REPORT)/asycmst/results.md: $(call ASYCMST_PRED,$(ASYCMST_METHODS))
	$(Q)$(call STEP,asycmst_report) $(USNODULE) report --runs $(ASYCMST_RUNS) --out $(@D) --exp $(EXP) \
	  --title AsyCMST $$(test -f $(PAIRED)/truth.csv && echo --truth $(PAIRED)/truth.csv) $(REPORT_ARGS)

# ---------------------------------------------------------------------------------------------- CSASN
# Multi-class (benign / PTC / FTC / MTC) on a still-image manifest with a subtype column (STILLS_MANIFEST; the
# synthetic subtype set of `usnodule synth --stills N` by default, or an imported one), folds grouped by patient
# and stratified by subtype (splits_subtype.json beside the manifest), one process per fold: `lightning fit` with
# test_after_fit fits, tests the best checkpoint and writes $(CSASN_RUNS)/fold<k>/{csasn.ckpt,
# predictions_csasn.csv}.  `make csasn` then writes the shared binary report (malignant probability; the
# generator's reference rows when truth.csv sits beside the manifest) and the multi-class report (mean ± std over
# folds, pooled confusion matrix) into $(REPORT)/csasn/.  `make csasn-ablation` fits the four ablations
# (CSASN_ABLATIONS) per fold and reports them with the full model in one table, $(REPORT)/csasn_ablation/.
# Paper size: make csasn CONF=conf EXP=paper STILLS_MANIFEST=/data/thyroid_subtypes/manifest.csv
STILLS_MANIFEST ?= $(SYNTH)/stills/manifest.csv
STILLS_DIR      = $(patsubst %/,%,$(dir $(STILLS_MANIFEST)))
CSASN_SPLITS    ?= $(STILLS_DIR)/splits_subtype.json
CSASN_CONF      ?= $(CONF)/csasn.yaml
CSASN_RUNS      := $(RUNS)/csasn
CSASN_ABL_RUNS  := $(RUNS)/csasn_ablation
CSASN_ABLATIONS ?= no_effnet no_vit no_refine no_dynamic
CSASN_SWITCH_no_effnet  := --model.init_args.use_cnn=false
CSASN_SWITCH_no_vit     := --model.init_args.use_vit=false
CSASN_SWITCH_no_refine  := --model.init_args.use_refinement=false
CSASN_SWITCH_no_dynamic := --model.init_args.class_weighting=none
CSASN_ARGS = --exp $(EXP) --data.init_args.manifest=$(STILLS_MANIFEST) --data.init_args.splits=$(CSASN_SPLITS) \
  --data.init_args.fold=$* --model.init_args.test_after_fit=true $(TRAINER_ARGS)
CSASN_ABL_PRED = $(foreach m,csasn $(addprefix csasn_,$(CSASN_ABLATIONS)),\
  $(foreach k,$(FOLD_IDS),$(CSASN_ABL_RUNS)/fold$(k)/predictions_$(m).csv))

.PHONY: csasn csasn-ablation
csasn: $(REPORT)/csasn/results_multiclass.md ## CSASN (subtypes + malignancy) on still images and its feature-forest baseline, every fold, both reports
	@echo && cat $(REPORT)/csasn/results.md $<
csasn-ablation: $(REPORT)/csasn_ablation/results_multiclass.md ## CSASN and its four ablations, every fold, one table
	@echo && cat $<

$(CSASN_SPLITS): $(STILLS_MANIFEST) | $(STAMP)
	$(Q)$(call STEP,splits_csasn) $(USNODULE) split $< -k $(FOLDS) --seed $(SEED) --stratify subtype --out $@

$(CSASN_RUNS)/fold%/predictions_csasn.csv: $(CSASN_CONF) $(CSASN_SPLITS) | $(STAMP)
	$(Q)$(call STEP,csasn,$*) $(FIT) -c $(CSASN_CONF) $(CSASN_ARGS) --model.init_args.predictions_dir=$(@D) \
	  --trainer.default_root_dir=$(@D)/csasn --ckpt_out=$(@D)/csasn.ckpt

# the ablations write beside a copy of the full model's predictions, so their folder holds the five methods
$(CSASN_ABL_RUNS)/fold%/predictions_csasn.csv: $(CSASN_RUNS)/fold%/predictions_csasn.csv
	@mkdir -p $(@D) && cp $< $@

define CSASN_ABLATION_RULE
$$(CSASN_ABL_RUNS)/fold%/predictions_csasn_$(1).csv: $$(CSASN_CONF) $$(CSASN_SPLITS) | $$(STAMP)
	$$(Q)$$(call STEP,csasn_$(1),$$*) $$(FIT) -c $$(CSASN_CONF) $$(CSASN_ARGS) $$(CSASN_SWITCH_$(1)) \
	  --model.init_args.method=csasn_$(1) --model.init_args.predictions_dir=$$(@D) \
	  --trainer.default_root_dir=$$(@D)/$(1) --ckpt_out=$$(@D)/csasn_$(1).ckpt
endef
$(foreach a,$(CSASN_ABLATIONS),$(eval $(call CSASN_ABLATION_RULE,$(a))))

# $(1): runs folder, $(2): report folder, $(3): title
define CSASN_REPORTS
	$(Q)$(call STEP,$(notdir $(2))_report) $(USNODULE) report --runs $(1) --out $(2) --exp $(EXP) --title "$(3)" \
	  $(call TRUTH,$(STILLS_DIR)) $(REPORT_ARGS)
	$(Q)$(call STEP,$(notdir $(2))_report_multiclass) $(USNODULE) report-multiclass --runs $(1) --out $(2) \
	  --exp $(EXP) --title "$(3)" $(call TRUTH,$(STILLS_DIR))
endef
# CSASN's non-deep baseline beside it in both reports: a multi-class random forest on shape + intensity/texture
# features of the drawn mask's nodule (`usnodule feature-forest`), fitted on each fold's training part only.
$(CSASN_RUNS)/feature_forest.done: $(STILLS_MANIFEST) $(CSASN_SPLITS) | $(STAMP)
	$(Q)$(call STEP,feature_forest) $(USNODULE) feature-forest --manifest $(STILLS_MANIFEST) --splits $(CSASN_SPLITS) \
	  --runs $(CSASN_RUNS) --folds $(FOLD_IDS) --seed $(SEED)
	$(Q)touch $@

$(REPORT)/csasn/results_multiclass.md: $(foreach k,$(FOLD_IDS),$(CSASN_RUNS)/fold$(k)/predictions_csasn.csv) \
  $(CSASN_RUNS)/feature_forest.done
	$(call CSASN_REPORTS,$(CSASN_RUNS),$(@D),CSASN)

$(REPORT)/csasn_ablation/results_multiclass.md: $(CSASN_ABL_PRED)
	$(call CSASN_REPORTS,$(CSASN_ABL_RUNS),$(@D),CSASN ablations)

# ---------------------------------------------------------------------------------------------- Two-stage
# TransUNet -> ROI -> ResNet-18 on still images (Abdelrazik et al. 2025), per fold of $(STILLS)/splits.json, and
# its baseline, a random forest on shape features of the same predicted masks; then the shared report, F1 first.
#   fold k: transunet.ckpt (lightning fit) -> still_masks.h5 (usnodule still-masks, every image)
#           -> roi_resnet18.ckpt (lightning fit on the predicted-mask ROIs) -> predictions_twostage.csv
#   all folds: predictions_shape_forest.csv (usnodule shape-forest) -> $(REPORT)/twostage/results.md
# STILLS: a still-image manifest folder (manifest.csv; splits.json is made beside it by `usnodule split`); the
# default is the synthetic still set with subtypes of `make data` (the one CSASN uses; malignant = any carcinoma,
# its label column), so both still-image systems are measured on the same images.  STILLS=$(SYNTH)/stills_cine
# exports one frame per nodule of the synthetic cine set instead (the one with the largest mask; `make stills`).
# TWOSTAGE_METHODS="twostage twostage_annotated" adds the annotated-ROI variant (crops around the drawn masks: not
# deployable) to the same report.
# Paper size: make twostage CONF=conf EXP=paper STILLS=data/stills
STILLS ?= $(SYNTH)/stills
TS_RUNS := $(RUNS)/twostage
TWOSTAGE_METHODS ?= twostage
TS_DATA = --exp $(EXP) --data.init_args.manifest=$(STILLS)/manifest.csv \
  --data.init_args.splits=$(STILLS)/splits.json --data.init_args.fold=$* $(TRAINER_ARGS)
TS_PER_FOLD = $(foreach k,$(FOLD_IDS),$(TS_RUNS)/fold$(k)/$(1))
TS_PRED = $(foreach m,$(1),$(call TS_PER_FOLD,predictions_$(m).csv))

.PHONY: twostage twostage-masks stills
# Named here so that make never deletes them as intermediates of the pattern chain (they are the fold's models).
.SECONDARY: $(foreach f,transunet.ckpt still_masks.h5 roi_resnet18.ckpt roi_resnet18_annotated.ckpt,$(call TS_PER_FOLD,$(f)))
stills: $(STILLS)/splits.json ## folds of the two-stage still set (STILLS=data/synth/stills_cine exports the cine set)
twostage-masks: $(call TS_PER_FOLD,still_masks.h5) ## two-stage stage 1: TransUNet + predicted masks, every fold
twostage: $(REPORT)/twostage/results.md ## two-stage TransUNet -> ResNet-18 vs shape forest, every fold, report
	@echo && cat $<

# The cine set's truth.csv (one row per nodule) is copied per exported still (case id = image id), so the report
# shows the generator's ceiling rows on the same images (the ceiling sees the whole sweep: a still cannot reach it).
STILL_TRUTH = import pandas as pd; m = pd.read_csv("$(1)/manifest.csv"); t = pd.read_csv("$(2)/truth.csv"); \
  t.merge(m[["case_id", "annot_id"]], on="annot_id").drop(columns="annot_id").rename(columns={"case_id": \
  "annot_id"}).to_csv("$(1)/truth.csv", index=False)
$(SYNTH)/stills_cine/manifest.csv: $(H5) | $(STAMP)
	$(Q)$(call STEP,stills) $(USNODULE) import-stills --layout stanford $(DATA) --frames largest --out $(@D) \
	  --overwrite
	$(Q)test ! -f $(DATA)/truth.csv || $(PY) -c '$(call STILL_TRUTH,$(@D),$(DATA))'

$(STILLS)/splits.json: $(STILLS)/manifest.csv | $(STAMP)
	$(Q)$(call STEP,splits_stills) $(USNODULE) split $< -k $(FOLDS) --seed $(SEED) --out $@

$(TS_RUNS)/fold%/transunet.ckpt: $(CONF)/transunet.yaml $(STILLS)/splits.json | $(STAMP)
	$(Q)$(call STEP,transunet,$*) $(FIT) -c $< $(TS_DATA) --trainer.default_root_dir=$(@D)/transunet --ckpt_out=$@

$(TS_RUNS)/fold%/still_masks.h5: $(TS_RUNS)/fold%/transunet.ckpt | $(STAMP)
	$(Q)$(call STEP,still_masks,$*) $(USNODULE) still-masks --manifest $(STILLS)/manifest.csv \
	  --splits $(STILLS)/splits.json --fold $* --seg $< --out $@

$(TS_RUNS)/fold%/roi_resnet18.ckpt: $(CONF)/roi_resnet18.yaml $(TS_RUNS)/fold%/still_masks.h5 | $(STAMP)
	$(Q)$(call STEP,roi_resnet18,$*) $(FIT) -c $< $(TS_DATA) --data.init_args.roi=predicted \
	  --data.init_args.predicted_masks=$(@D)/still_masks.h5 --trainer.default_root_dir=$(@D)/roi_resnet18 --ckpt_out=$@

$(TS_RUNS)/fold%/roi_resnet18_annotated.ckpt: $(CONF)/roi_resnet18.yaml $(STILLS)/splits.json | $(STAMP)
	$(Q)$(call STEP,roi_resnet18_annotated,$*) $(FIT) -c $< $(TS_DATA) --data.init_args.roi=annotated \
	  --data.init_args.predicted_masks=null --trainer.default_root_dir=$(@D)/roi_resnet18_annotated --ckpt_out=$@

$(TS_RUNS)/fold%/predictions_twostage.csv: $(TS_RUNS)/fold%/roi_resnet18.ckpt | $(STAMP)
	$(Q)$(call STEP,roi_predict,$*) $(USNODULE) roi-predict --ckpt $< --splits $(STILLS)/splits.json --fold $* \
	  --out-dir $(@D) --method twostage

$(TS_RUNS)/fold%/predictions_twostage_annotated.csv: $(TS_RUNS)/fold%/roi_resnet18_annotated.ckpt | $(STAMP)
	$(Q)$(call STEP,roi_predict_annotated,$*) $(USNODULE) roi-predict --ckpt $< --splits $(STILLS)/splits.json \
	  --fold $* --out-dir $(@D) --method twostage_annotated

$(TS_RUNS)/shape_forest.done: $(call TS_PER_FOLD,still_masks.h5) | $(STAMP)
	$(Q)$(call STEP,shape_forest) $(USNODULE) shape-forest --manifest $(STILLS)/manifest.csv \
	  --splits $(STILLS)/splits.json --runs $(TS_RUNS) --seed $(SEED)
	$(Q)touch $@

$(REPORT)/twostage/results.md: $(call TS_PRED,$(TWOSTAGE_METHODS)) $(TS_RUNS)/shape_forest.done
	$(Q)$(call STEP,twostage_report) $(USNODULE) report --runs $(TS_RUNS) --out $(@D) --exp $(EXP) \
	  --title "Two-stage" --first f1 $(call TRUTH,$(STILLS)) $(REPORT_ARGS)

# ---------------------------------------------------------------------------------------------- checks
LINTED := stages datamodules lightning_modules tests benchmarks
test: lint ## lint, then run the whole test suite
	$(PY) -m pytest

lint: $(STAMP) ## ruff format --check and ruff check (`ruff format` fixes the first)
	$(VENV)/bin/ruff format --check --quiet $(LINTED) || { echo "run: $(VENV)/bin/ruff format $(LINTED)"; exit 1; }
	$(VENV)/bin/ruff check --quiet $(LINTED)

clean-runs: ## remove runs/ and reports/ of EXP
	rm -rf $(RUNS) $(REPORT)

clean: ## remove generated data, runs, reports (keeps .venv)
	rm -rf data/synth runs reports lightning_logs wandb

# ---------------------------------------------------------------------------------------------- AsyCMST studies
# The paper's experiments as targets, each ending in `usnodule report-sweep` (results.md table + a plot, in
# $(REPORT)/asycmst_<study>/): Table 4 (asycmst-ablation-fss-ns), Table 5 (asycmst-ablation-strategies), the
# label-noise and contour sweeps of Sec. 4.7 (asycmst-noise, asycmst-contour) and the cross-data-set transfer of
# Sec. 4.3 (asycmst-transfer).  Every fit is the AsyCMST rule above (one process per fold: fit, then test) with
# the model switches of its variant (ASY_SWITCH_<method>, mirrored by stages/report_sweep.VARIANTS) and the
# datamodule's study options.  The clean fits of every variant live beside AsyCMST's in $(ASYCMST_RUNS)/fold<k>/
# and are shared: a sweep's level 0 and the transfer's in-domain row are copies of them, not refits.
# Demo-size defaults, to stay at CPU minutes: SWEEP_FOLDS (default folds 0 1 of the FOLDS-fold splits), the
# sweeps' models SWEEP_METHODS (AsyCMST and the baseline without ACMST, FSS, NS) and CONTOUR_METHODS (AsyCMST
# only: a model without NS never sees the masks).  Paper size: SWEEP_FOLDS="0 1 2 3 4", more methods.
# Like `make demo` these run -j$(JOBS) from a warm Python with W&B off (DEMO_WANDB).
SWEEP_FOLDS ?= 0 1
SWEEP_METHODS ?= asycmst asycmst_base
CONTOUR_METHODS ?= asycmst
NOISE_LEVELS ?= 0 0.1 0.2 0.3
CONTOUR_LEVELS ?= dilate_2 dilate_4 erode_2 erode_4 jitter_2 jitter_4
NOISE_SEED ?= $(SEED)
ASY_SWITCH_asycmst :=
ASY_SWITCH_asycmst_base := --model.init_args.strategy=none --model.init_args.fss=false --model.init_args.ns=false
ASY_SWITCH_asycmst_acmst := --model.init_args.fss=false --model.init_args.ns=false
ASY_SWITCH_asycmst_fss := --model.init_args.strategy=none --model.init_args.ns=false
ASY_SWITCH_asycmst_ns := --model.init_args.strategy=none --model.init_args.fss=false
ASY_SWITCH_asycmst_none := --model.init_args.strategy=none
ASY_SWITCH_asycmst_global := --model.init_args.strategy=global
ASY_SWITCH_asycmst_symmetric := --model.init_args.strategy=symmetric
ASY_SWITCH_asycmst_spatial := --model.init_args.strategy=spatial
ASY_SWITCH_asycmst_temporal := --model.init_args.strategy=temporal
FSS_NS_METHODS := asycmst_base asycmst_acmst asycmst_fss asycmst_ns asycmst_none asycmst
STRATEGY_METHODS := asycmst_none asycmst_global asycmst_symmetric asycmst asycmst_spatial asycmst_temporal
NOISE_RUNS := $(RUNS)/asycmst_noise
CONTOUR_RUNS := $(RUNS)/asycmst_contour
TRANSFER_RUNS := $(RUNS)/asycmst_transfer
# $(1): runs folder, $(2): methods -> their prediction files of the SWEEP_FOLDS
SWEEP_PRED = $(foreach m,$(2),$(foreach k,$(SWEEP_FOLDS),$(1)/fold$(k)/predictions_$(m).csv))
SWEEP_REPORT = $(USNODULE) report-sweep --folds $(SWEEP_FOLDS) $(SWEEP_REPORT_ARGS)

.PHONY: asycmst-ablation-fss-ns asycmst-ablation-strategies asycmst-noise asycmst-contour asycmst-transfer
# $(1): the report file
define STUDY
	@start=$$(date +%s); WANDB_MODE=$${WANDB_MODE:-$(DEMO_WANDB)} OMP_NUM_THREADS=1 $(WARM_RUN) $(MAKE) \
	  --no-print-directory -j$(JOBS) --output-sync=target $(1) && echo && cat $(1) && \
	echo "$(notdir $(patsubst %/,%,$(dir $(1)))): $$(( $$(date +%s) - start )) s (folds $(SWEEP_FOLDS); logs in $(RUNS)/logs/)"
endef
asycmst-ablation-fss-ns: | $(STAMP) ## Table 4: AsyCMST with ACMST / FSS / NS switched off, SWEEP_FOLDS, one table
	$(call STUDY,$(REPORT)/asycmst_fss_ns/results.md)
asycmst-ablation-strategies: | $(STAMP) ## Table 5: the six cross-attention strategies, SWEEP_FOLDS, one table
	$(call STUDY,$(REPORT)/asycmst_strategies/results.md)
asycmst-noise: | $(STAMP) ## label-noise sweep: AUROC vs fraction of flipped training labels (NOISE_LEVELS, SWEEP_METHODS)
	$(call STUDY,$(REPORT)/asycmst_noise/results.md)
asycmst-contour: | $(STAMP) ## contour sweep: AUROC vs NS-mask dilate/erode/jitter in px (CONTOUR_LEVELS, CONTOUR_METHODS)
	$(call STUDY,$(REPORT)/asycmst_contour/results.md)
asycmst-transfer: | $(STAMP) ## cross-data-set transfer: train on PAIRED / TRANSFER_B, test on both, every direction
	$(call STUDY,$(REPORT)/asycmst_transfer/results.md)

# $(1): output folder (fold% inside it), $(2): method, $(3): step name, $(4): extra arguments of the fit
define ASY_FIT_RULE
$(1)/fold%/predictions_$(2).csv: $$(ASYCMST_CONF) $$(PAIRED)/splits.json | $$(STAMP)
	$$(Q)$$(call STEP,$(strip $(3)),$$*) $$(FIT) -c $$(ASYCMST_CONF) $$(ASYCMST_ARGS) $$(ASY_SWITCH_$(2)) $(4) \
	  --model.init_args.method=$(2) --model.init_args.predictions_dir=$$(@D) \
	  --trainer.default_root_dir=$$(@D)/$(2) --ckpt_out=$$(@D)/$(2).ckpt
endef
# $(1): output folder, $(2): method: the clean fit's test predictions, copied (a sweep's level 0, in-domain rows)
define ASY_COPY_RULE
$(1)/fold%/predictions_$(2).csv: $$(ASYCMST_RUNS)/fold%/predictions_$(2).csv
	@mkdir -p $$(@D) && cp $$< $$@
endef
# the clean variants without a rule of their own above (asycmst, asycmst_none have one)
$(foreach m,asycmst_base asycmst_acmst asycmst_fss asycmst_ns asycmst_global asycmst_symmetric asycmst_spatial \
  asycmst_temporal,$(eval $(call ASY_FIT_RULE,$(ASYCMST_RUNS),$(m),$(m),)))
$(foreach L,$(NOISE_LEVELS),$(foreach m,$(SWEEP_METHODS),$(eval $(if $(filter 0,$(L)),\
  $(call ASY_COPY_RULE,$(NOISE_RUNS)/$(L),$(m)),\
  $(call ASY_FIT_RULE,$(NOISE_RUNS)/$(L),$(m),$(m)_noise$(L),--data.init_args.label_noise=$(L) \
    --data.init_args.noise_seed=$(NOISE_SEED))))))
$(foreach m,$(CONTOUR_METHODS),$(eval $(call ASY_COPY_RULE,$(CONTOUR_RUNS)/0,$(m))))
$(foreach L,$(CONTOUR_LEVELS),$(foreach m,$(CONTOUR_METHODS),$(eval $(call ASY_FIT_RULE,$(CONTOUR_RUNS)/$(L),$(m),\
  $(m)_$(L),--data.init_args.mask_noise=$(word 1,$(subst _, ,$(L))) \
  --data.init_args.mask_noise_px=$(word 2,$(subst _, ,$(L))) --data.init_args.noise_seed=$(NOISE_SEED)))))

$(REPORT)/asycmst_fss_ns/results.md: $(call SWEEP_PRED,$(ASYCMST_RUNS),$(FSS_NS_METHODS))
	$(Q)$(call STEP,asycmst_fss_ns_report) $(SWEEP_REPORT) --kind fss-ns --runs $(ASYCMST_RUNS) --out $(@D) \
	  --methods $(FSS_NS_METHODS) --title "AsyCMST Table 4: ACMST, FSS, NS ($(EXP))"
$(REPORT)/asycmst_strategies/results.md: $(call SWEEP_PRED,$(ASYCMST_RUNS),$(STRATEGY_METHODS))
	$(Q)$(call STEP,asycmst_strategies_report) $(SWEEP_REPORT) --kind strategies --runs $(ASYCMST_RUNS) \
	  --out $(@D) --methods $(STRATEGY_METHODS) --title "AsyCMST Table 5: cross-attention strategies ($(EXP))"
$(REPORT)/asycmst_noise/results.md: $(foreach L,$(NOISE_LEVELS),$(call SWEEP_PRED,$(NOISE_RUNS)/$(L),$(SWEEP_METHODS)))
	$(Q)$(call STEP,asycmst_noise_report) $(SWEEP_REPORT) --kind sweep --runs $(NOISE_RUNS) --out $(@D) \
	  --methods $(SWEEP_METHODS) --levels $(NOISE_LEVELS) --xlabel "fraction of training labels flipped" \
	  --title "AsyCMST: label noise ($(EXP))"
$(REPORT)/asycmst_contour/results.md: $(call SWEEP_PRED,$(CONTOUR_RUNS)/0,$(CONTOUR_METHODS)) \
  $(foreach L,$(CONTOUR_LEVELS),$(call SWEEP_PRED,$(CONTOUR_RUNS)/$(L),$(CONTOUR_METHODS)))
	$(Q)$(call STEP,asycmst_contour_report) $(SWEEP_REPORT) --kind sweep --runs $(CONTOUR_RUNS) --out $(@D) \
	  --methods $(CONTOUR_METHODS) --levels 0 $(CONTOUR_LEVELS) --xlabel "training NS masks perturbed by (px)" \
	  --title "AsyCMST: contour perturbation ($(EXP))"

# Transfer (Sec. 4.3): A = $(PAIRED), B = TRANSFER_B; fold k's model of each set is tested on the other set's fold-k
# test part by `lightning test` (no refit), beside each set's in-domain test.  The default B is drawn by the
# generator with PAIRED's settings and seed + 1 (other nodules and patients) and recorded by another scanner
# (TRANSFER_SHIFT: brighter gain, another display map, a wider PSF, half the frame rate); a real second set:
# TRANSFER_B=/data/breast_bus_ceus (a folder with manifest.csv; its splits.json is made beside it).
TRANSFER_B ?= $(SYNTH)/paired_shift
TRANSFER_SHIFT ?= --gain 1.3 --gamma 0.8 --psf 0.8 --frame-step 2
TRANSFER_METHODS ?= asycmst
TRANSFER_A_NAME ?= paired
TRANSFER_B_NAME ?= shifted
LIGHTNING_TEST := $(VENV)/bin/lightning test
# $(1): set trained on (manifest folder), $(2): set tested on, then fold $* (the test reloads the fold's model)
TRANSFER_ARGS = --exp $(EXP) --data.init_args.manifest=$(1)/manifest.csv --data.init_args.splits=$(1)/splits.json \
  --data.init_args.fold=$* --data.init_args.test_manifest=$(2)/manifest.csv \
  --data.init_args.test_splits=$(2)/splits.json --model.init_args.pretrained=false $(TRAINER_ARGS)
TA := $(TRANSFER_RUNS)/$(TRANSFER_A_NAME)
TB := $(TRANSFER_RUNS)/$(TRANSFER_B_NAME)

$(SYNTH)/paired_shift/manifest.csv: $(PAIRED)/manifest.csv $(SYNTH)/.shift_args | $(STAMP)
	$(Q)$(call STEP,shift_paired) $(USNODULE) shift-paired --like $(PAIRED) --out $(@D) $(TRANSFER_SHIFT)
$(SYNTH)/.shift_args: FORCE
	@mkdir -p $(@D); echo '$(TRANSFER_SHIFT)' | cmp -s - $@ || echo '$(TRANSFER_SHIFT)' > $@
$(TRANSFER_B)/splits.json: $(TRANSFER_B)/manifest.csv | $(STAMP)
	$(Q)$(call STEP,splits_transfer) $(USNODULE) split $< -k $(FOLDS) --seed $(SEED) --out $@

define TRANSFER_RULE
$$(TA)_to_$$(TRANSFER_A_NAME)/fold%/predictions_$(1).csv: $$(ASYCMST_RUNS)/fold%/predictions_$(1).csv
	@mkdir -p $$(@D) && cp $$< $$@
$$(TB)_to_$$(TRANSFER_B_NAME)/fold%/predictions_$(1).csv: $$(ASYCMST_CONF) $$(TRANSFER_B)/splits.json | $$(STAMP)
	$$(Q)$$(call STEP,$(1)_fit_$$(TRANSFER_B_NAME),$$*) $$(FIT) -c $$(ASYCMST_CONF) --exp $$(EXP) \
	  --data.init_args.manifest=$$(TRANSFER_B)/manifest.csv --data.init_args.splits=$$(TRANSFER_B)/splits.json \
	  --data.init_args.fold=$$* --model.init_args.test_after_fit=true $$(TRAINER_ARGS) $$(ASY_SWITCH_$(1)) \
	  --model.init_args.method=$(1) --model.init_args.predictions_dir=$$(@D) \
	  --trainer.default_root_dir=$$(@D)/$(1) --ckpt_out=$$(@D)/$(1).ckpt
$$(TA)_to_$$(TRANSFER_B_NAME)/fold%/predictions_$(1).csv: $$(ASYCMST_RUNS)/fold%/predictions_$(1).csv \
  $$(TRANSFER_B)/splits.json | $$(STAMP)
	$$(Q)$$(call STEP,$(1)_test_$$(TRANSFER_B_NAME),$$*) $$(LIGHTNING_TEST) -c $$(ASYCMST_CONF) \
	  $$(call TRANSFER_ARGS,$$(PAIRED),$$(TRANSFER_B)) $$(ASY_SWITCH_$(1)) --model.init_args.method=$(1) \
	  --model.init_args.predictions_dir=$$(@D) --trainer.default_root_dir=$$(@D)/$(1) \
	  --ckpt_path=$$(ASYCMST_RUNS)/fold$$*/$(1).ckpt
$$(TB)_to_$$(TRANSFER_A_NAME)/fold%/predictions_$(1).csv: $$(TB)_to_$$(TRANSFER_B_NAME)/fold%/predictions_$(1).csv \
  $$(PAIRED)/splits.json | $$(STAMP)
	$$(Q)$$(call STEP,$(1)_test_$$(TRANSFER_A_NAME),$$*) $$(LIGHTNING_TEST) -c $$(ASYCMST_CONF) \
	  $$(call TRANSFER_ARGS,$$(TRANSFER_B),$$(PAIRED)) $$(ASY_SWITCH_$(1)) --model.init_args.method=$(1) \
	  --model.init_args.predictions_dir=$$(@D) --trainer.default_root_dir=$$(@D)/$(1) \
	  --ckpt_path=$$(TB)_to_$$(TRANSFER_B_NAME)/fold$$*/$(1).ckpt
endef
$(foreach m,$(TRANSFER_METHODS),$(eval $(call TRANSFER_RULE,$(m))))

TRANSFER_DIRS = $(TA)_to_$(TRANSFER_A_NAME) $(TA)_to_$(TRANSFER_B_NAME) $(TB)_to_$(TRANSFER_B_NAME) \
  $(TB)_to_$(TRANSFER_A_NAME)
$(REPORT)/asycmst_transfer/results.md: $(foreach d,$(TRANSFER_DIRS),$(call SWEEP_PRED,$(d),$(TRANSFER_METHODS)))
	$(Q)$(call STEP,asycmst_transfer_report) $(SWEEP_REPORT) --kind transfer --runs $(TRANSFER_RUNS) --out $(@D) \
	  --methods $(TRANSFER_METHODS) --title "AsyCMST: cross-data-set transfer ($(EXP))"
