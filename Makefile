# Two commands on a fresh machine: `make demo` and `make test` (both set up the venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed before the project so that the project's install keeps this torch. From PyPI on Linux
# torch==2.13.0 is the (multi-GB) CUDA build: `TORCH_INDEX=https://download.pytorch.org/whl/cpu` gets the CPU one;
# GPU users may override, e.g. `TORCH_SPEC=torch==2.13.0+cu128 TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup demo test bench bench-quality toyworld report-screenshot clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/asdm-export demo --out asdm-demo --overwrite

# The demo's report.html as headless Chromium renders it (Debian: apt-get install -y chromium).
CHROMIUM ?= chromium
report-screenshot:
	test -f asdm-demo/check/report.html || $(MAKE) demo
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,2400 \
		--user-data-dir=$(CURDIR)/.chromium-profile --screenshot=$(CURDIR)/asdm-demo/report.png \
		file://$(CURDIR)/asdm-demo/check/report.html
	@echo "screenshot: asdm-demo/report.png"

test: setup
	$(PY) -m pytest -q -n auto --dist loadfile

bench: setup
	$(PY) benchmarks/bench_export.py

# The recipes of the shipped toy world (about an hour on 2 cores) and the quality table of RESULTS.md.
toyworld: setup
	$(VENV)/bin/asdm-export toyworld train --out toyworld/pipeline
	$(VENV)/bin/asdm-export toyworld judge --out toyworld/judge

bench-quality: setup
	cd benchmarks && ../$(PY) bench_quality.py --out ../bench-quality

clean:
	rm -rf asdm-demo .pytest_cache .chromium-profile bench-quality
