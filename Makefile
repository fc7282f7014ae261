# Two entry points for a new user: `make demo` and `make test`. Both create .venv and install everything.
# Where a system Python already has torch (a GPU build, say), the venv reuses it; otherwise the CPU
# build torch==2.13.0 is installed first so nothing pulls a multi-GB CUDA wheel.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow test-all app bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/lycotrain demo --out demo-out

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

test-all: setup
	$(PY) -m pytest -m ''

app: setup
	$(VENV)/bin/lycotrain app

bench: setup
	$(PY) benchmarks/adapters.py --quick

clean:
	rm -rf $(VENV) demo-out .pytest_cache
