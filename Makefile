PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint docs demo shrink bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,examples,docs]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# The documentation site, offline, into site/; --strict: a broken reference or link, a page
# missing from the nav or a docstring the reference cannot read fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Two workers, a test file per worker at a time (files share module-level model
# builds): the suite is mostly XLA compilation, one core each.
TEST_WORKERS ?= 2

test: lint docs
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: $(STAMP)
	$(BIN)/python examples/train_lm.py --out runs/demo

# Train the example LM, shrink it (half the MLP neurons, 3 of 4 heads) and distill it back.
shrink: $(STAMP)
	$(BIN)/python examples/shrink_lm.py --out runs/shrink

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_masks.py
	$(BIN)/python benchmarks/bench_step.py
	$(BIN)/python benchmarks/bench_loop.py
	$(BIN)/python benchmarks/bench_compile.py
	$(BIN)/python benchmarks/bench_checkpoint.py
	$(BIN)/python benchmarks/bench_shrink.py

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache
