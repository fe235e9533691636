# The two commands a newcomer needs: `make demo` and `make test`. Both create the virtualenv
# and install into it first, so they work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# setuptools explains strict editable installs at length on every install; the venv is ours.
PIP     = PYTHONWARNINGS=ignore $(PY) -m pip

.PHONY: demo test test-loaded test-concurrent coverage mutation lint bench clean install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=68" wheel
	$(PIP) install --quiet -e '.[test,bench]' --config-settings editable_mode=strict
	touch $(STAMP)

# Strict editable mode (so mypy sees the package-dir mapping) keeps a link tree that must be
# refreshed when modules are added; it is cheap, so every run refreshes it.
install: $(STAMP)
	$(PIP) install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=strict

demo: install
	$(PY) -m multikernel.services.demo $(if $(HOLD),--hold)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check shm protocol endpoints bus services upgrade
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest $(ARGS)

# The same run with a busy loop on every CPU (LOAD=N for another count): the suite waits on
# events and states, never on the clock, so it passes on a machine that is busy with something
# else (docs/testing.md). `make test-loaded ARGS=tests/bus` runs a part.
LOAD ?= $(shell nproc)
test-loaded: install
	@pids=""; for i in $$(seq $(LOAD)); do $(PYTHON) -c 'while True: pass' & pids="$$pids $$!"; done; \
	trap 'kill $$pids' EXIT; echo "$(LOAD) busy loops:$$pids"; $(VENV)/bin/pytest $(ARGS)

# Two whole test runs at once with demos looping beside them: each run and each host names what
# is machine-global (/dev/shm files, cgroups) with a part of its own, so none may see, count or
# remove another's (docs/testing.md). Logs in .concurrent/.
test-concurrent: install
	$(PY) tests/run_concurrently.py

# Line coverage of the package in every process the suite and the demo start (mkctl, the hub
# CLI, the agents in their namespaces, the resource actor...), with the pytest process's own total
# beside it (tests/run_coverage.py). ARGS passes pytest arguments.
coverage: install
	$(PY) tests/run_coverage.py $(ARGS)

# Mutation testing of bus/_router.py, bus/_names.py and shm/_pycore.py against their own tests
# (tests/run_mutation.py; cosmic-ray has a virtualenv of its own). MUTATE="--sample 60 router"
# tests a sample of one target. Run it on a clean working tree: mutants are written to disk.
MUTATE ?=
mutation: install
	test -x .mutation/venv/bin/cosmic-ray || ($(PYTHON) -m venv .mutation/venv && \
		PYTHONWARNINGS=ignore .mutation/venv/bin/pip install --quiet "cosmic-ray>=8.3")
	.mutation/venv/bin/python tests/run_mutation.py $(MUTATE)

bench: install
	$(PY) benchmarks/bench_transport.py --quick
	$(PY) benchmarks/bench_protocol.py --quick
	$(PY) benchmarks/bench_router.py --quick
	$(PY) benchmarks/bench_bus.py --quick
	$(PY) benchmarks/bench_scale.py --quick
	$(PY) benchmarks/bench_lifecycle.py --quick
	$(PY) benchmarks/bench_resource.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .concurrent .coverage-data .mutation
