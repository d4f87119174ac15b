# Set-up and the two everyday commands. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 CPU: the export extra's PyTorch. Installed first and alone so that pip
# never resolves a multi-GB CUDA build for it (point PIP_INDEX_URL at PyTorch's CPU index
# elsewhere if your pip would pick a CUDA wheel).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-c setup edge clean

$(BIN)/spiritlm-edge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	# Both ship a model file we need but declare heavy dependencies we must not pull
	# (torchaudio for torchfcpe, which would replace torch): install them without.
	$(BIN)/pip install --quiet --no-deps torchfcpe==0.0.4 silero-vad==6.2.3
	# llama-cpp-python compiles llama.cpp on first install (~10 min on 2 cores), then
	# pip's wheel cache makes it instant.
	$(BIN)/pip install --quiet -e ".[export,dev]"
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

# The edge install alone (no torch): what a Jetson or kiosk needs to run a bundle.
edge:
	$(PYTHON) -m venv .venv-edge
	.venv-edge/bin/pip install --quiet -e ".[mic]"

clean:
	rm -rf $(VENV) .venv-edge .pytest_cache
