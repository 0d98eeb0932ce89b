# `make setup` then `make test`: the two commands the README and CI (.ci/run) use.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH_CPU = torch==2.13.0

.PHONY: setup test clean

setup: $(VENV)/.installed

# The CPU build of torch lies on the local disk; a bare `torch` requirement would pull a multi-GB CUDA build,
# so it is installed first, and only where the venv has no torch yet.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m retrofit.eval.install_hook
	touch $@

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
