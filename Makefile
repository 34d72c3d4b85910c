# segdist — `make demo` and `make test` work on a fresh machine (they create .venv first).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
NPROC ?= 2
DATA := data/shapes
ifndef RUN
RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif
LAUNCH := $(VENV)/bin/accelerate launch --multi_gpu --num_processes $(NPROC) --num_machines 1 \
	--mixed_precision no --dynamo_backend no

.PHONY: demo test test-fast docs data venv clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $@

# The built-in synthetic dataset: 2000 training and 256 held-out validation scenes. `index` adds the
# member offsets the training stream reads by to splits converted before they were recorded (a no-op after).
data: venv $(DATA)/train.json $(DATA)/val.json
	$(PY) launch/shard.py index $(DATA)

$(DATA)/train.json: | $(VENV)/.installed
	$(PY) launch/shard.py shapes --out $(DATA) --split train --count 2000 --seed 1 --samples-per-shard 250 --workers 2

$(DATA)/val.json: | $(VENV)/.installed
	$(PY) launch/shard.py shapes --out $(DATA) --split val --count 256 --seed 2 --samples-per-shard 64

# Train the demo recipe with $(NPROC) processes (GPUs if present, else CPU processes over gloo),
# then evaluate its best checkpoint exactly and print the per-class table and mIoU.
demo: data
	HF_HUB_OFFLINE=1 $(LAUNCH) launch/train.py recipes/shapes_unet.toml --set train.run_dir=$(RUN)
	HF_HUB_OFFLINE=1 $(LAUNCH) launch/eval.py recipes/shapes_unet.toml --checkpoint $(RUN) \
		--out $(RUN)/metrics/final.json --report $(RUN)/report
	@echo
	@echo "Next: the run's curves, images and per-class IoU:  $(VENV)/bin/tensorboard --logdir $(RUN)/tensorboard"
	@echo "      its evaluation report (per-class table, confusion figure):  $(RUN)/report/"

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The tests not marked slow (those that train or launch several processes are): a quicker loop.
test-fast: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The user guides (docs/, mkdocs.yml) at http://127.0.0.1:8000, rebuilt on every save.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve
