# Two commands do everything: `make run` (the main job) and `make test` (the suite).
# Each one sets up what it needs when it is missing: the venv, the packages, WordNet.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NLTK_DATA := $(abspath $(VENV))/nltk_data
STAMP := $(VENV)/.installed
export NLTK_DATA

.PHONY: run test setup bench clean-runs

run: setup
	$(PY) -m pipeline run stages/clean.yaml

test: setup
	$(PY) -m pytest -q

setup: $(STAMP) $(NLTK_DATA)/corpora/wordnet/lexnames

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU wheel first; the range in pyproject.toml then keeps it.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

$(NLTK_DATA)/corpora/wordnet/lexnames: scripts/setup_wordnet.py
	$(PYTHON) scripts/setup_wordnet.py --dest $(NLTK_DATA)

bench: setup
	$(PY) bench/parse.py

clean-runs:
	rm -rf runs
