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

# The seed tutorials' story on synthetic data, no download: samcache_tiny (a demonstration model
# pretrained on synthetic "home" shapes, NOT a substitute for SAM) meets a shifted domain; its
# decoder is fine-tuned from the cache (a short run, so lr 3e-4: see README); zero-shot vs
# fine-tuned: report, mIoU-vs-clicks plot and before/after overlays of the same box prompts.
# Starts from a clean $(DEMO) folder each time.
VOC = $(DEMO)/data/VOCdevkit/VOC2007
demo: install clean-demo
	$(BIN)/embed demo-data --out $(DEMO)/data --n-images 24 --domain shifted --seed 1
	$(BIN)/embed run --images $(VOC)/JPEGImages --out $(DEMO)/cache.zarr --model-type samcache_tiny --precision fp32
	$(BIN)/embed status $(DEMO)/cache.zarr
	$(BIN)/decoder train --cache $(DEMO)/cache.zarr --prompts point,box --out $(DEMO)/run \
		--epochs 3 --iterations 3 --images-per-step 4 --objects-per-image 3 --lr 3e-4 --num-workers 0
	$(BIN)/decoder eval --cache $(DEMO)/cache.zarr --run $(DEMO)/run --split val \
		--clicks 1,2,3,5 --max-clicks 5 --out $(DEMO)/report
	$(BIN)/decoder predict --cache $(DEMO)/cache.zarr --run $(DEMO)/run --compare \
		--images "$$(paste -sd, $(VOC)/ImageSets/Segmentation/val.txt)" --out $(DEMO)/predict
	@echo "demo done: $(DEMO)/report (report.md, miou_vs_clicks.png), $(DEMO)/predict/overlays (before | after)"

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: install
	$(BIN)/python bench/bench_embed.py
	$(BIN)/python bench/bench_train.py

clean-demo:
	rm -rf $(DEMO)
