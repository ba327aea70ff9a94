# certaudit: the two set-up commands of the README create and fill .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,exact]'
	@touch $@

install: $(BIN)/.installed

# The main job on the embedded default (no download, no GPU).
demo: $(BIN)/.installed
	$(BIN)/certaudit demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
