# Engraving: `make demo` trains a small model on the built-in procedural engravings; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo
DEMO_DIR := outputs/demo
# bf16 autocast trains the demo 1.3x faster on CPUs with bf16 instructions (AVX512-BF16, AMX); `make demo DEMO_PRECISION=no` elsewhere.
DEMO_PRECISION ?= bf16

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest

demo: setup
	HF_HUB_OFFLINE=1 $(PY) prepare_dataset.py --source demo --num_images 2000 --image_size 64 --output_dir $(DEMO_DATA)
	HF_HUB_OFFLINE=1 $(PY) train.py --dataset_path $(DEMO_DATA) --preset demo --output_dir $(DEMO_DIR) \
		--mixed_precision $(DEMO_PRECISION) --train_batch_size 16 --learning_rate 1e-3 --generator_learning_rate 1e-3 --discriminator_learning_rate 2.5e-4 --max_train_steps 1000000 --max_train_minutes 4 --validation_epochs 1000 \
		--checkpointing_steps 1000000 --logging_steps 50

clean:
	rm -rf $(VENV) data outputs
