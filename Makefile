# Developer and CI entry points. Each target sets itself up from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsc-installed

.PHONY: setup demo test bench-compile clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Torch first, pinned (an unpinned torch pulls a multi-GB CUDA build), then the package.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/hstu/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench-compile: $(STAMP)
	$(PY) -m fsc.bench compile-overhead --json results/compile-overhead.json --readme README.md

clean:
	rm -rf $(VENV) build *.egg-info freescale_out
