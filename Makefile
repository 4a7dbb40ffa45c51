# `make demo` and `make test` bootstrap .venv on first use; the stamp makes reruns instant.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYC := env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=$(abspath $(VENV))/pycache

.PHONY: demo test venv clean

venv: $(STAMP)

# torch/torchvision are pinned in their own pip call: pip takes them from the local wheel cache
# (uv/poetry would download several GB); pyproject's ranges accept them.
# Bytecode: where PYTHONDONTWRITEBYTECODE=1 is set (as on CI), every process (each Ray worker) would compile
# torch & co from source again, which makes a fresh-clone suite several times slower (docs/benchmarks.md,
# "Test suite"). Instead of compiling all of the venv up front, demo and test write bytecode as modules are
# first imported, into .venv/pycache only (PYTHONPYCACHEPREFIX), so the source tree stays clean.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PYC) $(BIN)/imgcls-dist demo --workdir runs/demo

# Two pytest processes: the tests on the suite's one shared 2-CPU Ray stay in one (tests/conftest.py), while
# the Ray-free tests and those that start Rays of their own run beside them.
test: $(STAMP)
	$(PYC) $(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25 tests

clean:
	rm -rf runs .pytest_cache
