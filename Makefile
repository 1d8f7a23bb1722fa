# Set-up is part of every target: a fresh clone needs only `make pipeline` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: help install test pipeline benchmark gpu-check clean-runs

# `make` alone lists the targets; every target but help sets up .venv first.
.DEFAULT_GOAL := help

# Exact versions come from constraints.txt, so every machine resolves the same environment.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# One pytest worker per CPU (pytest-xdist), then the real-SLURM tests in a process of their own
# (tests/run.sh says why); TEST_WORKERS=0 runs the first part in one process too.
TEST_WORKERS ?= auto

test: $(STAMP)
	TEST_WORKERS=$(TEST_WORKERS) PYTHON=$(BIN)/python tests/run.sh $(PYTEST_ARGS)

pipeline: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash workflow/smoke.sh

benchmark: $(STAMP)
	$(BIN)/python benchmarks/cohort_throughput.py $(BENCHMARK_ARGS)

# On a machine with a CUDA GPU: the CUDA tests, the cohort benchmark on the GPU and a short real
# cohort training, logged to gpu-check/<time>/ (benchmarks/README.md). Refuses without a GPU.
gpu-check: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean-runs:
	rm -rf runs results/smoke mlruns.db mlartifacts .snakemake

# One line per target (tests/test_docs.py checks that every target of this file is listed).
help:
	@echo 'make pipeline    the whole pipeline, smoke profile, into results/smoke/ (AT_PROFILE=P, AT_SEEDS=0,2)'
	@echo 'make test        the test suite (TEST_WORKERS=0: one process; PYTEST_ARGS=...: to pytest)'
	@echo 'make benchmark   cohort vs solo throughput, JSON report in benchmarks/reports/ (BENCHMARK_ARGS=...)'
	@echo 'make gpu-check   on a CUDA GPU: CUDA tests, GPU benchmark, short training, in gpu-check/<time>/'
	@echo 'make clean-runs  delete runs/, results/smoke/, the MLflow store and .snakemake/'
	@echo 'make install     only the set-up: .venv with constraints.txt (every target does it first)'
	@echo 'make help        this list (README.md says more)'
