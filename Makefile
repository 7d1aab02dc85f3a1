# Two commands on a fresh machine: `make demo` (end-to-end demo) and `make test` (the test suite).
# Both create .venv with Python 3.10 (the openfhe wheel only imports on CPython 3.10) and install the package.

PY310 := $(shell for p in python3.10 $$HOME/.pyenv/versions/3.10*/bin/python3.10 /usr/local/bin/python3.10 /usr/bin/python3.10; do \
           $$p -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-all bench clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PY310)" || { echo "Python 3.10 not found: install python3.10 (the openfhe wheel needs CPython 3.10)"; exit 1; }
	test -x $(PY) || $(PY310) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/hf-polyhe demo $(DEMO_ARGS)

test: venv
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
