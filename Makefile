# hfcap: the two commands of the README (`make train`, `make test`) install what they need first, from the lock.
#
#   make train        the main job (scenes dataset, XE then SCST, test metrics) in .venv, installed from the lock
#   make test         the test suite in .venv (what CI runs first)
#   make test-floor   the model / generation / pipeline / Hub / remote-code tests on the oldest supported releases
#   make lock         refresh requirements/lock.txt (newest releases pyproject.toml allows) and requirements/floor.txt
#   make bench        CPU benchmarks
PYTHON ?= python3
VENV := .venv
FLOOR_VENV := .venv-floor
LOCK := requirements/lock.txt
FLOOR_LOCK := requirements/floor.txt
TEST_ENV := OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1
# What the floor environment re-runs: everything that touches transformers, huggingface_hub, tokenizers, timm,
# datasets and accelerate directly (the rest is plain torch / numpy / Java).
FLOOR_TESTS := tests/test_dependencies.py tests/test_copies.py tests/test_show_attend_tell.py \
	tests/test_show_attend_tell_parity.py tests/test_generation.py tests/test_conversion.py tests/test_processor.py \
	tests/test_tokenizer.py tests/test_pipeline.py tests/test_hub.py tests/test_remote_code.py tests/test_inference.py \
	tests/test_data_loaders.py tests/test_training_distributed.py tests/test_expansionnet_v2_modeling.py

.PHONY: install install-floor train test test-floor lock bench

install: $(VENV)/.install-stamp
install-floor: $(FLOOR_VENV)/.install-stamp

# The lock pins every package (torch 2.14.1 + torchvision 0.29.1 among them, which pip takes from this machine's
# disk); hfcap itself goes in editable, without dependencies, and `pip check` proves the lock satisfies its ranges.
%/.install-stamp:
	test -d $* || $(PYTHON) -m venv $*
	$*/bin/pip install -q --upgrade pip
	$*/bin/pip install -q -r $(if $(filter $(FLOOR_VENV),$*),$(FLOOR_LOCK),$(LOCK))
	$*/bin/pip install -q --no-deps -e .
	$*/bin/pip check
	touch $@
$(VENV)/.install-stamp: pyproject.toml $(LOCK)
$(FLOOR_VENV)/.install-stamp: pyproject.toml $(FLOOR_LOCK)

train: install
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no examples/train.py

test: install
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q

test-floor: install-floor
	$(TEST_ENV) $(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

# Resolve in throw-away environments: the newest releases within pyproject.toml's ranges, and the floor pins of
# requirements/floor.in with everything else resolved around them.
lock:
	rm -rf .venv-lock .venv-lock-floor
	$(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q ".[dev]"
	.venv-lock/bin/pip freeze --exclude hfcap > $(LOCK)
	$(PYTHON) -m venv .venv-lock-floor && .venv-lock-floor/bin/pip install -q --upgrade pip
	.venv-lock-floor/bin/pip install -q -r requirements/floor.in ".[dev]"
	.venv-lock-floor/bin/pip freeze --exclude hfcap > $(FLOOR_LOCK)
	rm -rf .venv-lock .venv-lock-floor

bench: install
	$(VENV)/bin/python benchmarks/bench_cider.py
