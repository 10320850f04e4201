# corral: `make demo` shows it working, `make test` proves it (host cgroup v2 tier, then a
# real systemd booted in a throwaway nspawn container: system manager and user manager).
# Both install what is missing first (apt packages, the venv, the package).

SHELL       := /bin/bash
PY          := /usr/bin/python3
VENV        := .venv
VPY         := $(VENV)/bin/python
APT_PKGS    := libsystemd-dev pkg-config systemd-container python3-venv python3-dev gcc
PYTEST      := $(VENV)/bin/pytest -q -p no:cacheprovider
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: all deps test test-host test-systemd test-user demo bench clean

all: test

# Debian's /usr/bin/python3 on purpose: the same venv then also runs inside the container,
# which sees only the host's /usr.
$(VENV)/.installed: pyproject.toml
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "corral: installing apt packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "corral: need root to install:$$missing (sudo apt-get install$$missing)"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@[ -x $(VPY) ] || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

deps: $(VENV)/.installed

test: deps test-host test-systemd test-user

test-host: deps
	@echo "== tier 1: cgroupfs backend on this host's cgroup v2 =="
	CORRAL_TEST_BACKENDS=cgroupfs $(PYTEST) tests

test-systemd: deps
	@echo "== tier 2: systemd backend, system manager (root) in a throwaway container =="
	$(PY) tests/nspawn.py -- env CORRAL_TEST_BACKENDS=systemd $(PYTEST) tests

test-user: deps
	@echo "== tier 3: systemd backend, user manager (uid 1001) in a throwaway container =="
	$(PY) tests/nspawn.py --user -- env CORRAL_TEST_BACKENDS=systemd $(PYTEST) tests

demo: deps
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash tests/demo.sh

bench: deps
	@echo "# corral benchmarks ($$(date -u +%Y-%m-%d), $$(nproc) cores)" > bench/RESULTS.md; echo >> bench/RESULTS.md
	$(VPY) bench/bench.py --backend cgroupfs >> bench/RESULTS.md
	$(PY) tests/nspawn.py -- $(VPY) bench/bench.py --backend systemd >> bench/RESULTS.md
	$(PY) tests/nspawn.py --user -- $(VPY) bench/bench.py --backend systemd >> bench/RESULTS.md
	@cat bench/RESULTS.md

clean:
	rm -rf $(VENV) build src/*.egg-info
