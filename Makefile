# `make demo`: set up and run the study on the bundled models.  `make test`: set up and run the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export NLTK_DATA ?= $(abspath ../shared/nltk_data)

.PHONY: setup demo test bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python circuits.py study --out reports/study

test: setup
	$(BIN)/python -m pytest -q -n auto

bench: setup
	$(BIN)/python bench/bench_head_masks.py

clean:
	rm -rf $(VENV) reports
