# corral: `make demo` shows it working, `make test` proves it (host cgroup v2 tier, then a
# real systemd booted in a throwaway nspawn container: system manager and user manager).
# Both install what is missing first (apt packages, the venv, the package).

SHELL       := /bin/bash
PY          := /usr/bin/python3
VENV        := .venv
VPY         := $(VENV)/bin/python
APT_PKGS    := libsystemd-dev pkg-config systemd-container python3-venv python3-dev gcc bubblewrap faketime tmux
PYTEST      := $(VENV)/bin/pytest -q -p no:cacheprovider
export PYTHONDONTWRITEBYTECODE := 1
# What depends on the backend runs in every tier; config, auth and pure tests only on the host.
BACKEND_TESTS := tests/test_runs.py tests/test_lifecycle.py tests/test_library.py tests/test_session_runs.py \
                 tests/test_agent_runs.py tests/test_auth_run.py tests/test_systemd_view.py tests/test_deploy.py \
                 tests/test_isolation.py tests/test_logs.py tests/test_top.py tests/test_shared_owner.py

# The real agent CLIs, from npm, as test inputs (tests/test_agent_clis.py). Pinned: the
# adapters write files in the shape these versions read (auth/adapters.py).
# openclaw needs Node >= 24.16; Debian's is older, so a Node from npm serves it.
AGENT_CLIS  := .agent-clis
AGENT_PKGS  := @openai/codex@0.171.0 @anthropic-ai/claude-code@2.1.197 openclaw@2026.9.6
NODE_ARCH   := $(if $(filter aarch64,$(shell uname -m)),arm64,x64)
AGENT_NODE  := node-linux-$(NODE_ARCH)@24.22.3
AGENT_NODE_BIN := $(CURDIR)/$(AGENT_CLIS)/node/node_modules/node-linux-$(NODE_ARCH)/bin

.PHONY: all deps agent-clis test lint test-host test-stress-quick test-systemd test-user demo bench stress clean install install-user uninstall uninstall-user wheels

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
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,systemd]'
	@touch $@

deps: $(VENV)/.installed

$(AGENT_CLIS)/.installed: Makefile
	@command -v npm >/dev/null || { echo "corral: installing npm"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; }
	npm install --silent --no-audit --no-fund --prefix $(AGENT_CLIS)/node $(AGENT_NODE)
	PATH=$(AGENT_NODE_BIN):$$PATH npm install --silent --no-audit --no-fund --prefix $(AGENT_CLIS) $(AGENT_PKGS)
	@touch $@

agent-clis: $(AGENT_CLIS)/.installed

test: deps agent-clis lint test-host test-stress-quick test-systemd test-user

# ruff with its default rules and mypy --strict over the package (settings in pyproject.toml).
lint: deps
	@echo "== lint: ruff check src, mypy --strict =="
	$(VENV)/bin/ruff check src
	$(VENV)/bin/mypy

test-host: deps wheels
	@echo "== tier 1: cgroupfs backend on this host's cgroup v2 =="
	CORRAL_TEST_BACKENDS=cgroupfs $(PYTEST) tests

test-stress-quick: deps
	@echo "== fault-injection smoke run (make stress --quick) =="
	$(VPY) bench/stress.py --quick

test-systemd: deps wheels
	@echo "== tier 2: systemd backend, system manager (root) in a throwaway container =="
	$(PY) tests/nspawn.py -- env CORRAL_TEST_BACKENDS=systemd $(PYTEST) $(BACKEND_TESTS)

test-user: deps
	@echo "== tier 3: systemd backend, user manager (uid 1001) in a throwaway container =="
	$(PY) tests/nspawn.py --user -- env CORRAL_TEST_BACKENDS=systemd $(PYTEST) $(BACKEND_TESTS)

demo: deps
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VPY) tests/demo.py

# The bench measures what users get: corral installed from a wheel into a venv of its own,
# bytecode compiled by pip (not the editable dev venv, which recompiles on every start here).
BENCH_VENV  := .bench-venv
BPY         := $(BENCH_VENV)/bin/python
$(BENCH_VENV)/.installed: deps pyproject.toml $(shell find src -name '*.py' 2>/dev/null)
	@[ -x $(BPY) ] || $(PY) -m venv $(BENCH_VENV)
	@# pip compiles no bytecode under PYTHONDONTWRITEBYTECODE=1 (these machines export it): what a user has
	env -u PYTHONDONTWRITEBYTECODE $(BENCH_VENV)/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps .
	env -u PYTHONDONTWRITEBYTECODE $(BENCH_VENV)/bin/pip install -q --disable-pip-version-check '.[systemd,test]'
	env -u PYTHONDONTWRITEBYTECODE $(BPY) -m compileall -q -j0 $$($(BPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') >/dev/null
	@touch $@

bench: deps $(BENCH_VENV)/.installed
	@echo "# corral benchmarks ($$(date -u +%Y-%m-%d), $$(nproc) cores)" > bench/RESULTS.md; echo >> bench/RESULTS.md
	$(BPY) bench/bench.py --backend cgroupfs --editable-cli $(VENV)/bin/corral >> bench/RESULTS.md
	$(PY) tests/nspawn.py -- $(BPY) bench/bench.py --backend systemd --editable-cli $(VENV)/bin/corral >> bench/RESULTS.md
	$(PY) tests/nspawn.py --user -- $(BPY) bench/bench.py --backend systemd --editable-cli $(VENV)/bin/corral >> bench/RESULTS.md
	@cat bench/ANALYSIS.md >> bench/RESULTS.md
	@cat bench/RESULTS.md

# Fault injection and load (bench/stress.py): SIGKILLed owners, writers and refreshers, fuzzed
# names and values, 500 runs. Long; run by hand. `$(VPY) bench/stress.py --quick` is the CI smoke run.
stress: deps
	$(VPY) bench/stress.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) build src/*.egg-info

# --- deployment ---------------------------------------------------------------------------
# make install [PREFIX=/usr/local] [DESTDIR=] : package in its own venv under
# $(PREFIX)/lib/corral, `corral` in $(PREFIX)/bin, units in $(UNITDIR) with ExecStart paths
# following PREFIX, then daemon-reload. make install-user: the units for your user manager.
# PIP_FLAGS lets an offline install take wheels from a directory: PIP_FLAGS="--no-index
# --find-links=/path/to/wheels" (`make wheels` fills .wheels/ with every wheel needed).

PREFIX      ?= /usr/local
DESTDIR     ?=
BINDIR      := $(PREFIX)/bin
LIBDIR      := $(PREFIX)/lib/corral
DOCDIR      := $(PREFIX)/share/doc/corral
UNITDIR     ?= /etc/systemd/system
USERUNITDIR ?= $(HOME)/.config/systemd/user
PIP_FLAGS   ?=
UNITS       := $(wildcard units/*)

wheels:
	$(VENV)/bin/pip wheel -q --disable-pip-version-check -w .wheels '.[systemd]' 'setuptools>=77' wheel

install:
	@[ -x $(PY) ] || { echo "corral: $(PY) is missing (apt-get install python3-venv)"; exit 1; }
	$(PY) -m venv $(DESTDIR)$(LIBDIR)/venv
	env -u PYTHONDONTWRITEBYTECODE $(DESTDIR)$(LIBDIR)/venv/bin/pip install -q --disable-pip-version-check $(PIP_FLAGS) '.[systemd]'
	@# a venv records its own path: when staged under DESTDIR, point it at the final one
	@if [ -n "$(DESTDIR)" ]; then grep -rlI -- "$(DESTDIR)$(LIBDIR)" $(DESTDIR)$(LIBDIR)/venv/bin \
	  $(DESTDIR)$(LIBDIR)/venv/pyvenv.cfg | xargs -r sed -i "s|$(DESTDIR)$(LIBDIR)|$(LIBDIR)|g"; fi
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(DOCDIR)
	ln -sfn $(LIBDIR)/venv/bin/corral $(DESTDIR)$(BINDIR)/corral
	install -m 0644 README.md $(DESTDIR)$(DOCDIR)/README.md
	@# the units come from the installed package: the same code as `corral install-units`
	$(DESTDIR)$(LIBDIR)/venv/bin/python -m corral install-units --prefix $(PREFIX) --dest $(DESTDIR)$(UNITDIR) --no-reload
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "corral installed: $(BINDIR)/corral, units in $(UNITDIR)"

install-user:
	@[ -x $(BINDIR)/corral ] || { echo "corral: run 'make install PREFIX=$(PREFIX)' first (or set PREFIX)"; exit 1; }
	$(BINDIR)/corral install-units --user --prefix $(PREFIX) --dest $(USERUNITDIR)

uninstall:
	-@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemctl disable --now corral-broker.socket corral-gc.timer 2>/dev/null; \
	  systemctl stop corral-broker.service corral-gc.service 2>/dev/null; fi; true
	for u in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$(basename $$u); done
	rm -f $(DESTDIR)$(BINDIR)/corral
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(DOCDIR)
	@# a private prefix (/opt/corral) goes entirely; shared ones (/usr/local) keep their dirs
	@case "$(PREFIX)" in /usr|/usr/local|/) ;; *) for d in bin lib share/doc share ""; do \
	  rmdir $(DESTDIR)$(PREFIX)/$$d 2>/dev/null || true; done;; esac
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "corral uninstalled from $(PREFIX)"

uninstall-user:
	-@systemctl --user disable --now corral-broker.socket corral-gc.timer 2>/dev/null; true
	for u in $(UNITS); do rm -f $(USERUNITDIR)/$$(basename $$u); done
	@systemctl --user daemon-reload 2>/dev/null || true
