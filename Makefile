# Set-up and the two everyday commands. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 CPU: the export extra's PyTorch. Installed first and alone so that pip
# never resolves a multi-GB CUDA build for it (point PIP_INDEX_URL at PyTorch's CPU index
# elsewhere if your pip would pick a CUDA wheel).
TORCH_SPEC ?= torch==2.13.0
# The one pin of llama-cpp-python is in pyproject.toml; the set-up reads it from there.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

.PHONY: demo test test-c test-fast check setup edge clean

$(BIN)/spiritlm-edge: pyproject.toml
	@echo "Setting up $(VENV) (torch CPU, the export and dev extras)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	@# llama-cpp-python compiles llama.cpp the first time (~10 min on 2 cores); pip's wheel
	@# cache makes later set-ups instant. Its verbose log goes to a file, progress to the screen.
	@# spiritlm_edge/llama_build.py picks the compiler where llama.cpp's AMX kernels would be
	@# built (GCC < 13 miscompiles them); elsewhere it runs the plain `pip install`.
	@echo "llama-cpp-python $(LLAMA_CPP_VERSION): compiling llama.cpp unless pip has it cached (log: $(VENV)/llama-cpp-build.log)"
	@$(BIN)/python spiritlm_edge/llama_build.py plan
	@$(BIN)/python spiritlm_edge/llama_build.py install "llama-cpp-python==$(LLAMA_CPP_VERSION)" 2>&1 | tee $(VENV)/llama-cpp-build.log \
		| awk '/\[ *[0-9]+%\]/ { match($$0, /[0-9]+%/); p = substr($$0, RSTART, RLENGTH - 1) + 0; \
		  if (p >= shown + 10) { printf "  llama.cpp build: %d%%\n", p; shown = p } }' \
		|| { tail -n 40 $(VENV)/llama-cpp-build.log; exit 1; }
	@# setuptools warns that the folder spiritlm_edge/ might shadow the package: it is the package.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet -e ".[export,dev]"
	@# Last and without dependencies: we only read the model files they ship, and their declared
	@# dependencies (torchaudio for torchfcpe) would replace torch. --no-deps also keeps pip from
	@# reporting those undeclared dependencies as a conflict.
	$(BIN)/pip install --quiet --no-deps torchfcpe==0.0.4 silero-vad==6.2.3
	touch $@

setup: $(BIN)/spiritlm-edge

demo: setup
	$(BIN)/spiritlm-edge demo

test: setup
	$(BIN)/python -m pytest -q
	$(MAKE) test-c

# The C/C++ client (CMakeLists.txt): built in build/ with -Werror under AddressSanitizer +
# UndefinedBehaviorSanitizer; its ctest suite runs against this venv's `spiritlm-edge serve`.
test-c: setup
	cmake -S . -B build -DSLE_WERROR=ON -DSLE_SANITIZE=ON -DSPIRITLM_EDGE_EXECUTABLE=$(abspath $(BIN))/spiritlm-edge
	cmake --build build -j 2
	ctest --test-dir build --output-on-failure

# The quick tier while editing: every test that takes more than a few seconds is marked slow.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Lint, format and types. mypy cannot follow setuptools' editable-install finder through our
# package-dir mapping (spiritlm_edge.runtime is runtime/, ...), so it reads a tree of links that
# lays the folders out as the installed package.
TYPECHECK_TREE := build/typecheck
check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@mkdir -p $(TYPECHECK_TREE)/spiritlm_edge
	@for f in spiritlm_edge/*.py; do ln -sfn $(CURDIR)/$$f $(TYPECHECK_TREE)/spiritlm_edge/; done
	@for d in runtime export quant bench server; do ln -sfn $(CURDIR)/$$d $(TYPECHECK_TREE)/spiritlm_edge/$$d; done
	cd $(TYPECHECK_TREE) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p spiritlm_edge

# The edge install alone (no torch): what a Jetson or kiosk needs to run a bundle.
edge:
	$(PYTHON) -m venv .venv-edge
	.venv-edge/bin/pip install --quiet -e ".[mic]"

clean:
	rm -rf $(VENV) .venv-edge .pytest_cache .mypy_cache build
