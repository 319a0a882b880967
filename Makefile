# Two commands matter: `make demo` and `make test`. Both create .venv if missing and install first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= demo_out

.PHONY: install browser demo test test-fast lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch==2.13.0 first: it resolves to the local CPU wheel; pyproject keeps a range so GPU users get CUDA builds.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]' torch==2.13.0
	touch $(STAMP)

# tests/test_mlflow_ui.py drives Debian's `chromium` through Playwright (its own browser download is not used); it
# skips, saying why, without one. Installed here when missing and run as root; never needed by `make demo`.
browser:
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then \
	  (apt-get update && apt-get install -y chromium) || echo "note: apt-get could not install chromium"; \
	else echo "note: no chromium (as root: apt-get install chromium); the MLflow UI browser test will skip"; fi; }

install: $(STAMP) browser

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh $(DEMO)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=15

# Ray-free feedback loop (< 2 min on 2 cores): loop, tasks, losses, pretext ops, configs, metrics, CLI validation.
test-fast: $(STAMP)
	SWINSSL_TEST_FAST=1 $(BIN)/python -m pytest -q -m "not ray" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .

# Speed/memory benchmarks (each runs its baseline in the same command); results in bench_out/*/result.json.
bench: $(STAMP)
	$(BIN)/python benchmarks/prepare.py --studies 4
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/step.py --roi 64 --steps 8 --warmup 2
	$(BIN)/python benchmarks/infer.py
	$(BIN)/python benchmarks/scaling.py

clean:
	rm -rf $(DEMO) .pytest_cache
