# Two-command quickstart: `make demo` and `make test` (both install first when needed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYSTEM_PKGS := libopencv-dev libturbojpeg0-dev libjpeg-dev pkg-config build-essential
# What the tests need besides: headless Chromium opens the report page (tests/test_report.py); Slurm's daemons
# run a two-node cluster on this machine (tests/test_slurm.py).
TEST_PKGS := chromium slurm-wlm
TEST_CMDS := chromium slurmctld slurmd sbatch
# The CPU/CUDA torch build served from local disk on our machines; elsewhere pip resolves current releases.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install system-deps test-deps demo test test-fast bench clean
install: $(STAMP)

# FFCV 1.0.2 ships only an sdist that compiles against OpenCV and libjpeg-turbo found through pkg-config;
# our rsb_ffcv/_jpeg.c (region decoding) links libjpeg-turbo's libjpeg API.
system-deps:
	@if pkg-config --exists opencv4 libturbojpeg libjpeg 2>/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PKGS); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PKGS); \
	else echo "error: FFCV and rsb_ffcv/_jpeg.c need system packages; run: sudo apt-get update && sudo apt-get install -y $(SYSTEM_PKGS)" >&2; exit 1; fi

$(STAMP): pyproject.toml setup.py rsb_ffcv/_jpeg.c | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PIN) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q numpy
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test-deps:
	@if for c in $(TEST_CMDS); do command -v $$c >/dev/null 2>&1 || exit 1; done; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_PKGS); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_PKGS); \
	else echo "error: the tests need system packages; run: sudo apt-get update && sudo apt-get install -y $(TEST_PKGS)" >&2; exit 1; fi

demo: install
	$(PY) -m rsb_ffcv.demo

# Everything (about 17 minutes on 2 cores: 16 min 46 s measured on 2026-12-04, see the README); test-fast leaves
# out the tests marked slow (multi-process, cgroup, report and end-to-end runs) for everyday edits. Both run the
# test files in TEST_WORKERS pytest-xdist processes: many tests wait (on Slurm's and the process group's timeouts,
# on child processes), and one file per worker keeps a file's fixtures in one process (tests/conftest.py).
TEST_WORKERS ?= 2
# --no-loadscope-reorder: xdist would hand out the files with the most tests first; tests/conftest.py orders
# them longest first instead, so that the two workers end together.
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: install test-deps
	$(PYTEST) --durations=25 tests

test-fast: install
	$(PYTEST) -m "not slow" tests

clean:
	rm -rf $(VENV) data runs wandb bench_out
