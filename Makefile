# Set-up on a fresh machine: `make demo` or `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test chromium test-long bench bench-quick soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q "torch==2.13.0"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[eval,dev,onnx,serve,scale,test-servers]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kindling demo

# The playground's browser test drives Debian's chromium (Playwright's own browser download is not
# used); installed here when missing and this is root on a Debian machine.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -q && apt-get install -y -q chromium) >/dev/null; } || \
	  echo "chromium not installed: the browser test will be skipped"

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q tests

test-long: $(STAMP)
	KINDLING_LONG=1 $(BIN)/python -m pytest -q tests

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# The soak (docs/reliability.md, "Soak"): real processes SIGKILLed SOAK_KILLS times under traffic.
# Not part of `make test`; about 45 minutes for 1,000 kills on 2 cores, then the long API fuzz
# (docs/reliability.md, "Fuzzed API": 1,000 cases per operation and the stateful scenarios).
SOAK_KILLS ?= 1000
soak: $(STAMP)
	SOAK_KILLS=$(SOAK_KILLS) $(BIN)/python benchmarks/soak.py
	KINDLING_LONG=1 $(BIN)/python -m pytest -q -s tests/test_api_fuzz.py

clean:
	rm -rf $(VENV) demo-store .pytest_cache
