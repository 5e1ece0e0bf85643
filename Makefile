# `make demo`: set up and run the study on the bundled models (demo sizes).  `make test`: set up and run the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export NLTK_DATA ?= $(abspath ../shared/nltk_data)

# The demo runs every section of the study at smaller sizes than the paper's (about 5 minutes on
# 2 cores, BENCHMARKS.md); `make study` runs it at the paper's sizes (about 10 minutes there).
DEMO_SIZES := --examples 500 --single-examples 500 --sweep-examples 40 --search-examples 40 \
	--edge-examples 20 --mib-examples 8

.PHONY: setup demo study test bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python circuits.py study --out reports/study $(DEMO_SIZES)

study: setup
	$(BIN)/python circuits.py study --out reports/study

test: setup
	$(BIN)/python -m pytest -q -n auto

bench: setup
	$(BIN)/python bench/bench_head_masks.py

clean:
	rm -rf $(VENV) reports
