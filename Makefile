# Engraving: `make demo` trains a small model on the built-in procedural engravings; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo
DEMO_DIR := outputs/demo

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest

demo: setup
	HF_HUB_OFFLINE=1 $(PY) prepare_dataset.py --source demo --num_images 2000 --image_size 64 --output_dir $(DEMO_DATA)
	HF_HUB_OFFLINE=1 $(PY) train.py --dataset_path $(DEMO_DATA) --preset demo --output_dir $(DEMO_DIR) \
		--train_batch_size 32 --learning_rate 1e-3 --lr_warmup_steps 30 --max_train_steps 2000 --max_train_minutes 5 \
		--validation_epochs 100 --prior_fit_steps 2000 --prior_fit_batch_size 1024 --prior_fit_learning_rate 3e-3 \
		--logging_steps 25

clean:
	rm -rf $(VENV) data outputs
