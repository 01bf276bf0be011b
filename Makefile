# Two commands do all set-up on a fresh machine with only python3:
#   make demo   - venv, install with the local model, run examples/quickstart.py
#   make test   - venv, install test deps, run the whole suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

# llama.cpp must be built portable: the CPUs here report AMX but the VMs do
# not allow it, and a native build dies in the first decode (a general protection
# fault at `ldtilecfg` in libggml-cpu.so).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# Wheels are cached per version *and* build flags, so a wheel built with other
# flags (pip's own cache keys by version only) is never reused by mistake.
LLAMA_FLAGS_ID := $(shell echo '$(LLAMA_CMAKE_ARGS)' | cksum | cut -d' ' -f1)
WHEELHOUSE ?= $(HOME)/.cache/xcs_jax/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_FLAGS_ID)

# jax 0.12 needs Python >= 3.12; the core suite also runs there.
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	  $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
VENV312 := .venv-jax012

.PHONY: demo test test-fast test-jax012 stress bench clean print-python312

$(WHEELHOUSE)/.built:
	mkdir -p $(WHEELHOUSE)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PYTHON) -m pip --disable-pip-version-check wheel \
	  --no-deps --no-cache-dir --no-binary llama-cpp-python \
	  -w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

$(VENV)/.installed: pyproject.toml $(WHEELHOUSE)/.built
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --find-links $(WHEELHOUSE) -e '.[local,openai,anthropic,server,ray,test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# Without the real model and server: seconds, for the edit-test loop.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q tests -m "not local_model and not server and not ray"

# The long profiles of the fuzz suite (10,000 examples per property) and the
# fault suite (100,000 calls at 10% injected faults); prints their figures.
stress: $(VENV)/.installed
	XCS_STRESS=1 $(PY) -m pytest -q tests/test_fuzz.py tests/test_faults.py

$(VENV312)/.installed: pyproject.toml
	@test -n "$(PYTHON312)" || { echo "python3.12 not found: set PYTHON312=/path/to/python3.12"; exit 1; }
	test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --disable-pip-version-check 'jax>=0.12,<0.13' 'jaxlib>=0.12,<0.13'
	$(VENV312)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# The core suite (no llama.cpp) on jax 0.12, where ClosedJaxpr and Jaxpr merged.
test-jax012: $(VENV312)/.installed
	$(VENV312)/bin/python -c 'import jax; print("jax", jax.__version__)'
	$(VENV312)/bin/python -m pytest -q tests -m "not local_model and not server"

print-python312:
	@echo $(PYTHON312)

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(VENV312) build *.egg-info
