# Developer and CI entry points. Each target sets itself up from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsc-installed

.PHONY: setup demo test test-fast bench bench-setup bench-compile clean

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

# TorchRec 1.8.0 + fbgemm-gpu-cpu 1.8.0 (TORCHREC_PKGS below) for the fsc.integrations.torchrec
# tests and the benchmark's TorchRec peer, with --no-deps (their own requirements would pull
# another torch). Best effort for the tests: without a package index they skip, saying why.
TORCHREC_STAMP := $(VENV)/.fsc-torchrec-installed
$(TORCHREC_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(TORCHREC_PKGS) \
		&& touch $(TORCHREC_STAMP) \
		|| echo "make: TorchRec not installed (no package index?): its tests will skip"

# Everything, with the 25 slowest tests listed at the end (CI runs this).
test: $(STAMP) $(TORCHREC_STAMP)
	$(PY) -m pytest -q --durations=25 tests

# While you work: everything but the tests that start processes (marker `ranks`), compile
# through Inductor (marker `inductor`: g++ per graph) or take over ~2 s each (marker `slow`:
# the Triton-interpreter sweep, Dynamo traces of the HSTU example; one interpreter case per
# kernel mode stays): 926 of 1,150 tests, 44 s wall warm on 2 quiet cores (2026-12-06) (make test: all).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ranks and not inductor and not slow" tests

# make bench: the end-to-end benchmark (results/e2e.json, results/e2e*.png, README table), then
# the TorchRec models under eager, Inductor and fsc (results/torchrec-models.json, README table).
# TorchRec 1.8.0 + fbgemm-gpu-cpu 1.8.0 install with --no-deps on torch 2.13 CPU (their own
# requirements would pull another torch); then the pure-Python packages torchrec imports, pinned.
# BENCH_ARGS passes options (e.g. BENCH_ARGS=--quick). The benchmark commits exactly its outputs
# (in a git work tree; BENCH_COMMIT=0 skips that; a --quick smoke run never commits).
BENCH_STAMP := $(VENV)/.fsc-bench-installed
BENCH_ARGS ?=
BENCH_COMMIT ?= $(if $(findstring --quick,$(BENCH_ARGS)),0,1)
BENCH_OUTPUTS := results/e2e.json results/e2e.png results/e2e-bubbles.png results/torchrec-models.json README.md
# The TorchRec run takes TORCHREC_BENCH_ARGS (python -m bench torchrec-models --help); a --quick
# smoke run writes its JSON outside results/ and leaves the README alone.
QUICK := $(findstring --quick,$(BENCH_ARGS))
TORCHREC_BENCH_ARGS ?= $(if $(QUICK),--ranks 2 --warmup 1 --steps 3 --batch 16,--readme README.md)
TORCHREC_JSON := $(if $(QUICK),$(or $(TMPDIR),/tmp)/torchrec-models-quick.json,results/torchrec-models.json)
TORCHREC_PKGS := fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0 tensordict==0.15.3 cloudpickle==3.1.2 pyvers==0.2.3 \
	torchmetrics==1.0.3 lightning-utilities==0.15.3 tqdm==4.70.1 pyre-extensions==0.0.32 typing-inspect==0.9.0 \
	mypy-extensions==1.2.0

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) -m pip install --quiet --no-deps $(TORCHREC_PKGS)
	touch $(TORCHREC_STAMP) $(BENCH_STAMP)

bench-setup: $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench e2e --json results/e2e.json --readme README.md $(BENCH_ARGS)
	$(PY) -m bench torchrec-models --json $(TORCHREC_JSON) $(TORCHREC_BENCH_ARGS)
	@if [ "$(BENCH_COMMIT)" = "1" ] && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		outputs=$$(ls $(BENCH_OUTPUTS) 2>/dev/null); \
		git add -- $$outputs && git commit -m "make bench: end-to-end and TorchRec results ($$(date -u +%Y-%m-%d))" -- $$outputs \
			|| echo "make bench: nothing committed (outputs unchanged, or git refused)"; \
	fi

bench-compile: $(STAMP)
	$(PY) -m bench compile-overhead --json results/compile-overhead.json --readme README.md

# make gpu-check: on a machine with CUDA, check and time every CUDA path in under 8 minutes
# (results/gpu.json and the README's GPU section). Installs nothing, reads nothing outside the
# repository: it runs $(GPU_PYTHON) (default $(PYTHON), whose torch and Triton it uses) from the
# checkout. GPU_CHECK_ARGS passes options (e.g. --budget-s 300, --only speed).
GPU_PYTHON ?= $(PYTHON)
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	$(GPU_PYTHON) -m bench gpu-check --json results/gpu.json --readme README.md $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info freescale_out
