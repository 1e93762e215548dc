# calm-lightning front door. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CALM := $(VENV)/bin/calm
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install prepare train-ae train-lm train-ar compare-heads compare-k ablations test lint format bench tensorboard clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Build .venv and install the kit (torch 2.13.0 CPU pinned) in editable mode

prepare: $(STAMP) ## Fetch and tokenize the default corpus into shards (idempotent)
	$(CALM) prepare experiments/ae.yaml $(ARGS)

train-ae: $(STAMP) ## Train the robust autoencoder (experiments/ae.yaml) and export it for train-lm
	$(CALM) train experiments/ae.yaml logging.resume=true $(ARGS)

train-lm: $(STAMP) ## Train CALM with the energy head (experiments/calm_energy.yaml); needs train-ae
	$(CALM) train experiments/calm_energy.yaml logging.resume=true $(ARGS)

train-ar: $(STAMP) ## Train the token-level Transformer baseline (experiments/ar_baseline.yaml)
	$(CALM) train experiments/ar_baseline.yaml logging.resume=true $(ARGS)

artifacts/autoencoder.pt: | $(STAMP)
	$(MAKE) train-ae

compare-heads: $(STAMP) artifacts/autoencoder.pt ## Train CALM with the energy, flow and diffusion heads on one budget, then compare (~35 min on 2 cores)
	for head in energy flow diffusion; do \
		$(CALM) train experiments/compare/heads_$$head.yaml logging.resume=true $(ARGS) || exit 1; done
	$(CALM) compare runs/heads_energy runs/heads_flow runs/heads_diffusion --out runs/compare_heads --limit-batches 8

compare-k: $(STAMP) ## Train an autoencoder and CALM-energy per K in 1,2,4,8 and the token baseline, then compare (~60 min on 2 cores, projected from the 2026-12-04 run)
	for k in 1 2 4 8; do $(CALM) train experiments/compare/ae_k$$k.yaml logging.resume=true $(ARGS) || exit 1; done
	for k in 1 2 4 8; do $(CALM) train experiments/compare/calm_k$$k.yaml logging.resume=true $(ARGS) || exit 1; done
	$(CALM) train experiments/compare/k_ar_baseline.yaml logging.resume=true $(ARGS)
	$(CALM) compare runs/calm_k1 runs/calm_k2 runs/calm_k4 runs/calm_k8 runs/k_ar_baseline --out runs/compare_k --limit-batches 8

ABLATION_AES := ae_l128 ae_l64 ae_l32 ae_1000 ae_beta1e-2 ae_beta1e-4
ABLATIONS := base base_s7 n4 n16 m16 head_blocks2 head_blocks3 head_width512 lr3e-4 lr2e-3 warmup0 batch32 l64 l64_s7 l32 ae1000 l64_aux1 l64_aux3 l64_beta1e-2 l64_beta1e-4 l64_aux1_beta1e-4

ablations: $(STAMP) ## One-at-a-time CALM ablations on one budget + the baseline, then compare (docs/ablations.md)
	for ae in $(ABLATION_AES); do $(CALM) train experiments/ablations/$$ae.yaml logging.resume=true $(ARGS) || exit 1; done
	for run in $(ABLATIONS); do $(CALM) train experiments/ablations/$$run.yaml logging.resume=true $(ARGS) || exit 1; done
	$(CALM) train experiments/ar_baseline.yaml logging.resume=true $(ARGS)
	$(CALM) compare $(addprefix runs/abl_,$(ABLATIONS)) runs/ar_baseline --out runs/ablations --limit-batches 8 --gen-tokens 0

test: $(STAMP) ## Run the test suite (CPU, a few minutes)
	$(VENV)/bin/pytest tests $(ARGS)

lint: $(STAMP) ## Check style with ruff
	$(VENV)/bin/ruff check src tests benchmarks

format: $(STAMP) ## Format and fix imports with ruff
	$(VENV)/bin/ruff check --fix --select I src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: $(STAMP) ## Run the benchmarks; results go to benchmarks/results/
	$(PY) benchmarks/run_all.py $(ARGS)

tensorboard: $(STAMP) ## Serve the runs folder in TensorBoard
	$(VENV)/bin/tensorboard --logdir runs --bind_all

clean: ## Remove runs, artefacts and caches (never the source)
	rm -rf runs artifacts .cache .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
