# Two set-up commands on a fresh machine (see README):
#   make demo   installs everything and runs the main job on the embedded default (digits)
#   make test   installs everything and runs the test suite
PYTHON ?= python3

.PHONY: install demo test lint benchmarks

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) -m virtnet.cli demo

# pytest exits 5 when it collects no test: reported, not treated as a crash
test: install
	@$(PYTHON) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 0; fi; exit $$rc

lint:
	$(PYTHON) -m ruff check src tests benchmarks

benchmarks: install
	$(PYTHON) benchmarks/baselines.py
	$(PYTHON) benchmarks/train_loop_overhead.py
