# Set-up and the two everyday commands: `make demo` and `make test`.
# The default install pins the CPU build of torch; see README.md for GPU installs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: venv demo test test-slow lint docs clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,plot,data,docs]"
	touch $@

demo: venv
	$(BIN)/flowsolve demo

test: venv
	$(BIN)/python -m pytest -q -n auto

test-slow: venv
	$(BIN)/python -m pytest -q -n auto -m slow

lint: venv
	$(BIN)/ruff check flowsolve tests examples benchmarks

docs: venv
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis site
