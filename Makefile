# invprop developer entry points. `make setup` is idempotent: Debian packages are checked with dpkg (no
# network when all are present) and the venv is rebuilt only when pyproject.toml or requirements.lock change.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
PYTHON      := $(VENV)/bin/python
VENV_STAMP  := $(VENV)/.invprop-installed
ARGS        ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

# Build deps of FFCV (g++, pkg-config, opencv4.pc, libturbojpeg), the data set, and a real local SLURM
# cluster with accounting (slurmdbd + MariaDB), which submitit needs to poll job states.
APT_PACKAGES := dataset-fashion-mnist g++ pkg-config libopencv-dev libturbojpeg0-dev \
                munge slurmctld slurmd slurm-client slurmdbd mariadb-server

# Run apt-get as root directly, otherwise through sudo when available.
SUDO := $(shell [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && echo sudo)

.PHONY: help setup apt-packages run test lint lock clean-venv

help:
	@echo "make setup   - install Debian packages (if missing) and the venv in $(VENV)"
	@echo "make run     - python launchers/submit.py \$$(ARGS)   e.g. make run ARGS='cluster=local'"
	@echo "make test    - start the local SLURM cluster (if it can) and run pytest \$$(PYTEST_ARGS) on 2 workers"
	@echo "make lint    - ruff check"
	@echo "make lock    - rewrite requirements.lock from the current venv"

setup: apt-packages $(VENV_STAMP)

# Checked on every call (a dpkg query takes milliseconds), so a venv copied to a fresh machine still gets
# its system libraries; apt-get update runs only when something is missing.
apt-packages:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV_STAMP): pyproject.toml requirements.lock | apt-packages
	@if [ ! -x $(PYTHON) ]; then \
	  if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi; \
	  echo "Creating $(VENV) with $$py"; \
	  $$py -m venv $(VENV); \
	fi
	$(PYTHON) -m pip install -q -e '.[dev,ffcv]' -c requirements.lock
	@touch $@

run: setup
	$(PYTHON) launchers/submit.py +experiment=fmnist_demo $(ARGS)

# The local SLURM cluster is started on its own ports and reached through SLURM_CONF (nothing in /etc is
# touched). When it cannot start, test-env says why in one line and the cluster tests skip with that reason;
# with INVPROP_SLURM_REQUIRED=1 (CI) that is an error instead.
# Two workers, a test module each at a time (module fixtures run once): most tests are single-process launches
# that leave the second core idle. TEST_WORKERS=0 runs the suite in this process.
test: setup
	@envs="$$(bash slurm/local-cluster.sh test-env)" || exit 1; eval "$$envs"; \
	$(PYTHON) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

lock: setup
	@{ echo "# Full pin set of the project's environment (pip freeze --exclude-editable of a venv built by 'make setup')."; \
	   echo "# Used as a constraint: pip install -e '.[dev,ffcv]' -c requirements.lock. Regenerate with 'make lock'."; \
	   $(PYTHON) -m pip freeze --exclude-editable; } > requirements.lock.tmp
	@mv requirements.lock.tmp requirements.lock
	@touch $(VENV_STAMP)

clean-venv:
	rm -rf $(VENV)
