# The README's commands. Each one creates the environment first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Offline by design: nothing reaches a model or dataset hub, here or in CI.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

.PHONY: demo test lab env clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

## The main job: the whole pipeline in tiny mode, ending in an HTML report (runs/demo/report.html).
demo: $(STAMP)
	VISCODEX_LITE_MODE=$${VISCODEX_LITE_MODE:-tiny} $(BIN)/viscodex-lite demo

## Every test: unit tests, then every notebook through nbmake in tiny mode.
test: $(STAMP)
	VISCODEX_LITE_MODE=tiny TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
	  $(BIN)/python -m pytest --nbmake --nbmake-timeout=120 --doctest-modules --durations=15 -q -rs viscodex_lite tests notebooks

## JupyterLab on notebooks/ with the kit's kernel (as root too, e.g. in a container).
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf $(VENV) runs build site _build
