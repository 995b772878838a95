# Two commands do everything on a fresh machine: `make repro` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro test test-workflows test-slow test-faults test-hypothesis test-shuffled bench lock clean-venv dvc-remote

setup: $(STAMP)

# Rebuilt only when the lock or the project metadata change, so a second `make` installs nothing.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

repro: $(STAMP)
	dvc repro

test: $(STAMP)
	pytest -n auto --dist loadfile --cov --cov-report=term --cov-fail-under=85 -m "not slow" --durations=15

# The four GitHub workflows run end to end by act (self-hosted mode, no Docker), offline: a local bare repository as
# origin, S3 on 127.0.0.1 as the DVC remote, local stand-ins for every `uses:` and for gh (docs/operations.md).
test-workflows: $(STAMP)
	pytest -m workflows --durations=10

# Exploration, not CI: every Hypothesis test with 2,000 fresh random examples (tests/conftest.py's profiles).
test-hypothesis: $(STAMP)
	HYPOTHESIS_PROFILE=thorough pytest -m hypothesis

# The suite in a shuffled order of files and tests (the seed is printed; --random-order-seed=N replays it).
test-shuffled: $(STAMP)
	pytest -n auto --dist loadfile -p random_order --random-order -m "not slow"

test-slow: $(STAMP)
	pytest -m slow

# The fault suite alone, long variants included (bad input, crashes, concurrent readers, outages, secrets);
# it ends with its counts: cases tried, failed, production models checked and lost.
test-faults: $(STAMP)
	pytest -m fault

# After `make repro` (bench/rule.py and bench/serve.py read its outputs); the real-candle figures need ../shared/data.
bench: $(STAMP)
	python bench/features.py
	python bench/state.py
	python bench/predict.py
	python bench/serve.py
	python bench/bot.py
	python bench/walkforward.py
	python bench/rule.py
	if [ -d ../shared/data ]; then python bench/real_candles.py; else echo "../shared/data not found: real-candle figures skipped"; fi

# CI (after setup): the S3-compatible DVC remote given by the environment (DVC_REMOTE_URL, DVC_REMOTE_ENDPOINT),
# written to the untracked .dvc/config.local; without DVC_REMOTE_URL the remote in .dvc/config is used.
dvc-remote:
ifdef DVC_REMOTE_URL
	dvc remote add --local --force --default ci "$(DVC_REMOTE_URL)"
	$(if $(DVC_REMOTE_ENDPOINT),dvc remote modify --local ci endpointurl "$(DVC_REMOTE_ENDPOINT)")
else
	@echo "DVC_REMOTE_URL is not set: using the default remote of .dvc/config"
endif

# Re-resolve pinned versions after editing dependencies in pyproject.toml (needs the registry).
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes --no-header -q -o requirements.lock

clean-venv:
	rm -rf $(VENV)
