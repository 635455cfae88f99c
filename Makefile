# Quick start: `make demo` (the whole pipeline on synthetic data) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: test demo lint imports typecheck pytest bench clean test-programs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: $(STAMP) test-programs lint imports typecheck pytest

# Programs the tests drive, as program:Debian-package (a program may be a file path, as the DICOMweb plugin
# is). Installed where missing and possible (root with apt-get, as CI runs); elsewhere their tests skip
# and say why.
TEST_PROGRAMS := chromium:chromium dciodvfy:dicom3tools storescu:dcmtk Orthanc:orthanc \
	DicomSRValidator:pixelmed-apps /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb \
	openssl:openssl

test-programs:
	@for pair in $(TEST_PROGRAMS); do prog=$${pair%%:*}; pkg=$${pair#*:}; \
	  { command -v $$prog || test -e $$prog; } >/dev/null 2>&1 && continue; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkg >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkg; } || \
	    echo "could not install $$pkg: the tests that need $$prog will skip"; \
	  else echo "$$prog not installed (Debian package $$pkg): the tests that need it will skip"; fi; \
	done

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# the stage rules of docs/architecture.md (contracts in pyproject.toml)
imports: $(STAMP)
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# one worker per core; a module's tests stay on one worker, so its fixtures are built once
pytest: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -n auto --dist loadfile

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/ichdet demo --out demo

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) demo .pytest_cache .mypy_cache .ruff_cache
