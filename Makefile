# The two commands a newcomer needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo serve test test-slow screenshot lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: on the project's CPU machines 2.13.0 is the local CPU build (no CUDA download)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q "torch>=2.4"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/difflm quickstart --out runs/quickstart

serve: $(STAMP)
	test -d runs/quickstart/mdlm || $(BIN)/difflm quickstart --out runs/quickstart
	$(BIN)/difflm serve runs/quickstart/mdlm runs/quickstart/ar

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

# the README's docs/playground.png, taken by the browser test (needs chromium and chromium-driver)
screenshot: $(STAMP)
	DIFFLM_PLAYGROUND_SHOT=docs/playground.png $(BIN)/python -m pytest -q tests/test_playground_browser.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
