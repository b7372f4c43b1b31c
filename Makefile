# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv and install samcache into it on first use (torch pinned: see README).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO    ?= demo

.PHONY: install demo test lint bench clean-demo

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# Synthetic VOC data -> cache (tiny random encoder, no download) -> fine-tune -> evaluate.
demo: install
	$(BIN)/embed demo-data --out $(DEMO)/data --n-images 24
	$(BIN)/embed run --images $(DEMO)/data/VOCdevkit/VOC2007/JPEGImages --out $(DEMO)/cache.zarr --model-type vit_tiny_random
	$(BIN)/embed status $(DEMO)/cache.zarr
	$(BIN)/decoder train --cache $(DEMO)/cache.zarr --prompts point,box --out $(DEMO)/run \
		--epochs 8 --iterations 1 --lr 1e-3 --images-per-step 2 --objects-per-image 2
	$(BIN)/decoder eval --cache $(DEMO)/cache.zarr --run $(DEMO)/run --split val --protocols box \
		--out $(DEMO)/report
	@echo "demo done: $(DEMO)/run (metrics.jsonl, curves.png), $(DEMO)/report (zero-shot vs fine-tuned)"

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: install
	$(BIN)/python bench/bench_embed.py
	$(BIN)/python bench/bench_train.py

clean-demo:
	rm -rf $(DEMO)
