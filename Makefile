# Two commands do everything on a fresh machine (see README.md):
#   make demo   install into .venv, then run the whole flow on the embedded default data
#   make test   install into .venv, run the checks (lint, format, types), then the test suite
# `make check` runs only the checks (with the strict docs build); .pre-commit-config.yaml runs
# the same ones on commit. `make docs` builds the docs site (mkdocs.yml) into site/. `make lock`
# re-resolves pyproject.toml's ranges in a scratch venv into constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
# Every package at the version the suite last passed with (`make lock` writes it), so that a
# release upstream cannot change what `make test` installs; pyproject.toml keeps the ranges.
CONSTRAINTS ?= constraints.txt
PIP_INSTALL := $(PY) -m pip install --quiet $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS))

.PHONY: install demo test check lint typecheck docs lock
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PIP_INSTALL) -e ".[test]"
	# tritonclient 2.51 pins numpy<2 and protobuf<5 in its metadata but runs with ours; its
	# perf_analyzer binary needs libb64 (Debian) and CUDA 12's runtime library to start.
	$(PIP_INSTALL) --no-deps tritonclient==2.51.0 python-rapidjson nvidia-cuda-runtime-cu12
	-if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libb64.so.0d; then \
		apt-get install -y -qq libb64-0d >/dev/null || (apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null); fi
	touch $@

demo: install
	$(VENV)/bin/aet demo

test: check
	$(PY) -m pytest

check: lint typecheck docs

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

# mypy cannot follow setuptools' package-dir mapping (training/ -> aet.training, ...), so it reads
# the package through a tree of links laid out as installed: build/mypy/aet/{*.py,training,...}.
MYPY_TREE := build/mypy
typecheck: install
	rm -rf $(MYPY_TREE) && mkdir -p $(MYPY_TREE)/aet
	for f in aet/*.py; do ln -s $(CURDIR)/$$f $(MYPY_TREE)/aet/; done
	for d in training server clients proto; do ln -s $(CURDIR)/$$d $(MYPY_TREE)/aet/$$d; done
	cd $(MYPY_TREE) && $(abspath $(VENV))/bin/mypy --config-file $(CURDIR)/pyproject.toml -p aet

# The docs site: docs/*.md and the API reference that mkdocstrings reads from the docstrings.
# Strict: a link to a missing page or anchor, a page left out of the nav or an API reference
# that no longer resolves fails the build (and so `make check`).
# Not --quiet: it hides the warnings from the count that --strict fails on. NO_MKDOCS_2_WARNING
# silences Material's banner about its end of life (May 2027; its successor is Zensical).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The newest versions pyproject.toml allows, installed without constraints into a scratch venv,
# frozen into constraints.txt (then run `make test` before committing it).
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(MAKE) install VENV=$(LOCK_VENV) CONSTRAINTS=
	printf '# Written by `make lock`: the versions `make install` installs.\n' > constraints.txt
	$(LOCK_VENV)/bin/python -m pip freeze --exclude-editable >> constraints.txt
