# Two commands do all the set-up: `make demo` (the main job) and `make test` (the test suite).
# Both create/reuse the virtual environment .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: demo test fuzz venv lint bench api clean

$(BIN)/vaelab: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a CPU build; an open range would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/vaelab

venv: $(BIN)/vaelab

demo: venv
	$(BIN)/vaelab demo --run runs/demo

test: venv
	$(BIN)/python -m pytest

# The property tests with fresh random examples each run; `make test` is deterministic.
fuzz: venv
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_fuzz_loaders.py tests/test_safe_loading.py tests/test_data_idx.py

lint: venv
	$(BIN)/ruff check src tests benchmarks

bench: venv
	$(BIN)/python benchmarks/train_throughput.py

# The API reference of the public names (vaelab.__all__) from their docstrings, by pdoc: docs/api/vaelab.html
# (generated, not committed; it builds offline, and the page loads nothing from the network).
api: venv
	$(BIN)/python -c "import pdoc" 2>/dev/null || $(BIN)/pip install -q -e ".[docs]"
	rm -rf docs/api
	$(BIN)/python -m pdoc vaelab --docformat restructuredtext -o docs/api
	@echo "docs/api/vaelab.html"

clean:
	rm -rf runs .pytest_cache
