# `make demo` and `make test` bootstrap .venv on first use; the stamp makes reruns instant.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

# torch/torchvision are pinned in their own pip call: pip takes them from the local wheel cache
# (uv/poetry would download several GB); pyproject's ranges accept them.
# --no-compile: pip would byte-compile all ~19,000 .py files of the venv on one core (torch's 2,352 alone
# take 14 s on the 2-CPU CI box); Python compiles the few thousand a run imports on first use instead.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/imgcls-dist demo --workdir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
