# The way in. `make install` builds .venv with the exact pins in constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install test test-all lint format demo bench bench-quality bench-speed bench-smoke clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing the Debian package dataset-fashion-mnist"; \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
		|| echo "could not install dataset-fashion-mnist; pass --data DIR with the IDX files"; \
	fi

test:
	$(PY) -m pytest -q

test-all:
	$(PY) -m pytest -q -m ''

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo:
	$(VENV)/bin/decomp demo

clean:
	rm -rf runs .pytest_cache .ruff_cache
