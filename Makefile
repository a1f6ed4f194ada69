# The two commands of the README:
#   make run    set up the environment, then run the main job on digits
#   make test   set up the environment, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: env run test report bench clean-env

env:
	@VENV=$(VENV) bash scripts/setup_env.sh

run: env
	$(PY) -m comparisons run $(ARGS)

test: env
	$(PY) -m pytest $(PYTEST_ARGS)

report: env
	$(PY) -m linf_plugin.env

bench: env
	$(PY) benchmarks/lp_dist.py
	$(PY) benchmarks/bounds.py
	$(PY) benchmarks/certify.py
	$(PY) benchmarks/train.py

clean-env:
	rm -rf $(VENV)
