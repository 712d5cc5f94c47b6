# The README's two commands are `make serve` and `make test`; both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch; on a GPU host install the CUDA build of the same version into the venv first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install system-deps test test-fast lint format bench bench-peers clean serve shipped-model compare image-test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]' -e ./clients/python
	touch $@

# Debian packages for the browser, deployment-lint and image tests (scripts/system-deps.sh).
system-deps:
	bash scripts/system-deps.sh

# PYTEST_ARGS: extra pytest options (.ci/run passes --durations=15).
test: install system-deps
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The unit tests only (tests/unit, without the few marked slow): the quick loop while developing.
test-fast: install
	$(PY) -m pytest -q tests/unit -m "not slow" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install
	$(PY) bench/bench_model.py

# retserve against its peers (torchscale's RetNet, transformers' GPT-2): installs them, then measures.
bench-peers: install
	bash bench/peers/install.sh $(PY)
	$(PY) bench/bench_peers.py

# Build the CPU container image with buildah from a debootstrapped base and run the server in it
# (docker/image-test.sh; .ci/run runs it after the tests).
image-test: install system-deps
	bash docker/image-test.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

serve: install
	$(PY) -m server

# Rebuild the shipped default model from scratch (downloads the builtin corpus; ~45 min on 2 CPU cores).
shipped-model: install
	$(PY) -m training prepare builtin
	$(PY) -m training train-tokenizer --vocab-size 8192
	$(PY) -m training tokenize
	$(PY) -m training train --config small --set max_steps=900 max_minutes=52
	$(PY) -m training export --run runs/small --out checkpoints/retserve-small \
		--command "python -m training train --config small --set max_steps=900 max_minutes=52"

# RetNet vs Transformer baseline at matched size (needs the prepared corpus and tokenizer above).
compare: install
	$(PY) -m training compare
