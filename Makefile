# rexnet: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit install clean tools fuzz soak bench

# A regular (non-editable) install: setuptools' editable mode hides twisted/plugins from twistd.
# Then rexnet.cli.entry replaces pip's `rexnet` and `cexec` console scripts with scripts for
# `python -I -S` and, where a C compiler works, the native launcher (NATIVE=no: without it).
$(STAMP): pyproject.toml setup.py $(shell find rexnet twisted -name '*.py') \
          $(wildcard rexnet/crat/dashboard/static/* rexnet/cli/native/*.c rexnet/worker/native/*.c)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '.[test]'
	$(BIN)/python -P -m rexnet.cli.entry $(if $(filter no,$(NATIVE)),--no-native)
	rm -rf build
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m rexnet.cli.demo

lint: $(STAMP)
	$(BIN)/ruff check rexnet twisted tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy rexnet twisted/plugins tests benchmarks

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: tools $(STAMP) lint typecheck unit

# Benchmarks against ssh, GNU parallel and Slurm on a namespace bed (root; installs
# openssh-server, parallel and, if it can, slurm-wlm with apt). BENCH_ARGS=--quick is faster.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

# Tools the multi-host and terminal tests use (installed with apt when root on Debian;
# elsewhere those tests skip with a reason, or fail under CI=true).
tools:
	@missing=""; \
	for t in ip:iproute2 tc:iproute2 tmux:tmux nft:nftables chromium:chromium chromedriver:chromium-driver \
	         man:man-db groff:groff-base cc:gcc make:make; do \
	  command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; \
	done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis

# Longer runs than CI's: every decoder under atheris (FUZZ_RUNS each), the full soak.
FUZZ_RUNS ?= 200000
fuzz: $(STAMP)
	cd tests/fuzz && for t in announcement crat credential datagram frames revocation \
	  trust_file worker_datagram job_frames agent_messages; do \
	  ../../$(BIN)/python atheris_run.py $$t -runs=$(FUZZ_RUNS) -max_len=5000 || exit 1; done

# The full soak (1,000 jobs, 4 clients, 4 workers; CI runs 200) and a 30 s flood.
SOAK_JOBS ?= 1000
soak: tools $(STAMP)
	CI=true REXNET_SOAK_JOBS=$(SOAK_JOBS) $(BIN)/python -m pytest -q -s tests/test_soak.py
	CI=true REXNET_FLOOD_SECONDS=30 $(BIN)/python -m pytest -q -s tests/test_flood.py
