# The two commands of the README:
#   make run    set up the environment, then run the main job on digits
#   make test   set up the environment, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers for make test (the suite runs each test on one thread; files stay
# whole on one worker so module and session fixtures are built once per file)
TEST_JOBS ?= auto

# make gpu-check OUT=dir [WHEELS=dir] [SEED_REPO=path] [PYTHON=python3] [DRY_RUN=1]
#   every GPU check (compute-sanitizer over every kernel family, pytest -m gpu, the CUDA
#   benchmarks, a short comparisons run), each time-limited, in under 10 minutes, with the
#   machine's own Python (torch + CuPy), not the venv; see scripts/gpu_check.py
# make gpu-wheels
#   the wheels that Python lacks (auto_LiRPA, appdirs, graphviz, compute-sanitizer), for
#   CPython 3.12 on manylinux x86_64, into .whl/ (ignored by git; carry it to the GPU machine
#   and pass WHEELS=.whl)
PYTHON ?= python3

.PHONY: env run test report bench clean-env gpu-check gpu-wheels

env:
	@VENV=$(VENV) bash scripts/setup_env.sh

run: env
	$(PY) -m comparisons run $(ARGS)

test: env
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

report: env
	$(PY) -m linf_plugin.env

bench: env
	$(PY) benchmarks/lp_dist.py
	$(PY) benchmarks/bounds.py
	$(PY) benchmarks/certify.py
	$(PY) benchmarks/train.py

clean-env:
	rm -rf $(VENV)

gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=dir [WHEELS=dir] [SEED_REPO=path] [PYTHON=python3]"; exit 2; }
	$(PYTHON) scripts/gpu_check.py --out "$(OUT)" --python "$(PYTHON)" $(if $(WHEELS),--wheels "$(WHEELS)") \
		$(if $(SEED_REPO),--seed-repo "$(SEED_REPO)") $(if $(DRY_RUN),--dry-run)

gpu-wheels:
	$(or $(wildcard $(PY)),$(PYTHON)) scripts/gpu_check.py --download-wheels .whl $(if $(DRY_RUN),--dry-run)
