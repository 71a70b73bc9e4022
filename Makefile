# Set-up and main jobs. `make demo` and `make test` work on a fresh machine (Python 3.10+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo
DEMO_DATA ?= data/digits
# CPU machines: pin the local CPU torch wheel so no CUDA build is pulled in.
CONSTRAINTS ?= constraints-cpu.txt
# Test files run in this many worker processes (pytest-xdist), whole files per worker, in the
# order tests/conftest.py gives (longest first): most tests launch multi-process jobs that spend
# their time starting up, and two workers keep two cores busy.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: venv test test-fast demo lint clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev,digits,vae]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PYTEST)

test-fast: venv
	$(PYTEST) -m "not slow"

lint: venv
	$(BIN)/ruff check switchdit_dist tests tools
	$(BIN)/ruff format --check switchdit_dist tests tools

demo: venv
	@start=$$(date +%s); \
	$(BIN)/switchdit prepare digits --out $(DEMO_DATA) && \
	$(BIN)/switchdit launch --nproc 2 -- train --config configs/demo.yaml --run-dir $(DEMO_DIR) $(DEMO_ARGS) && \
	$(BIN)/switchdit convert $(DEMO_DIR) $(DEMO_DIR)/model-ema.safetensors --weights ema && \
	$(BIN)/switchdit sample --checkpoint $(DEMO_DIR)/model-ema.safetensors --classes 0,1,2,3,4,5,6,7,8,9 \
		--per-class 10 --cfg-scale 3.0 --sampler ddpm --steps 100 --seed 0 --out $(DEMO_DIR)/samples.png \
		--npz $(DEMO_DIR)/samples.npz && \
	echo "" && \
	echo "demo finished in $$(( $$(date +%s) - start )) s" && \
	echo "  sample grid (one row per digit): $(DEMO_DIR)/samples.png" && \
	echo "  checkpoints:                     $(DEMO_DIR)/checkpoints (latest: $$(cat $(DEMO_DIR)/checkpoints/latest))" && \
	echo "  one-file EMA model:              $(DEMO_DIR)/model-ema.safetensors" && \
	echo "  metrics:                         $(DEMO_DIR)/metrics.jsonl" && \
	echo "  TensorBoard:                     $(BIN)/tensorboard --logdir $(DEMO_DIR)/tensorboard"

clean:
	rm -rf $(VENV) runs data .pytest_cache
