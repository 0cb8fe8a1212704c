# Two commands do everything on a fresh machine (see README.md):
#   make demo   install into .venv, then run the whole flow on the embedded default data
#   make test   install into .venv, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[test]"
	# tritonclient 2.51 pins numpy<2 and protobuf<5 in its metadata but runs with ours; its
	# perf_analyzer binary needs libb64 (Debian) and CUDA 12's runtime library to start.
	$(PY) -m pip install --quiet --no-deps tritonclient==2.51.0 python-rapidjson nvidia-cuda-runtime-cu12
	-if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libb64.so.0d; then \
		apt-get install -y -qq libb64-0d >/dev/null || (apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null); fi
	touch $@

demo: install
	$(VENV)/bin/aet demo

test: install
	$(PY) -m pytest
