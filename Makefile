# The README's commands. Each one creates the environment first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
TINY   := VISCODEX_LITE_MODE=tiny TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
# Offline by design: nothing reaches a model or dataset hub, here or in CI.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

.PHONY: demo test unit-test course-test docs docs-test lab env clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	touch $(DOCS_STAMP)

env: $(STAMP)

## The main job: the whole pipeline in tiny mode, ending in an HTML report (runs/demo/report.html).
demo: $(STAMP)
	VISCODEX_LITE_MODE=$${VISCODEX_LITE_MODE:-tiny} $(BIN)/viscodex-lite demo

## Every test: unit tests and every notebook (nbmake, tiny mode), then the course labs, then the docs site.
test: unit-test course-test docs-test

## Unit tests, doctests and every notebook through nbmake in tiny mode.
unit-test: $(STAMP)
	$(TINY) $(BIN)/python -m pytest --nbmake --nbmake-timeout=120 --doctest-modules --durations=15 -q -rs \
	  -m "not course and not docs" viscodex_lite tests notebooks

## Course labs: every solution copy runs under nbmake, every student copy fails exactly at its exercises.
course-test: $(STAMP)
	$(TINY) $(BIN)/python -m pytest -q -rs -m course tests/test_course.py

## The docs site: every notebook executed in tiny mode, README, API reference → site/ (works offline).
docs: $(DOCS_STAMP)
	$(BIN)/viscodex-lite course docs -o site

## The docs-site test: builds the site in a temporary folder and checks pages, figures, offline assets.
docs-test: $(DOCS_STAMP)
	$(TINY) $(BIN)/python -m pytest -q -rs -m docs tests/test_docs_site.py

## JupyterLab on notebooks/ with the kit's kernel (as root too, e.g. in a container).
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf $(VENV) runs build site _build
