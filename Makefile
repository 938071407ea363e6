# presence-gateway: the two commands a newcomer needs are `make run` and `make test`.
# Both install what they need first (Debian's redis packages, a virtualenv, the Rust module).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test setup system-deps native lint fmt bench peer clean js dist

run: setup
	$(VENV)/bin/presence-gateway dev

# The secured slice: pusher-js conformance, the incident replays and kill -9 healing again,
# against topologies with TLS only and ACL users (cluster up --secure).
SECURE_SLICE := tests/test_conformance_pusherjs.py tests/test_incident.py \
	tests/test_chaos.py::test_incident_replay_under_load tests/test_chaos.py::test_kill_node

test: setup lint js
	cargo test --workspace --quiet
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)
	PG_SECURE=1 $(VENV)/bin/pytest $(SECURE_SLICE) $(PYTEST_ARGS)

setup: system-deps $(STAMP) native

# pusher-js for the conformance tests, installed exactly as pinned in tests/js/package-lock.json.
js: tests/js/node_modules

tests/js/node_modules: tests/js/package-lock.json
	@command -v npm >/dev/null || { echo "npm (Node.js >= 20) is required for the pusher-js tests"; exit 1; }
	npm ci --no-audit --no-fund --prefix tests/js
	touch tests/js/node_modules

system-deps:
	@bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	@command -v python3 >/dev/null || { echo "python3 (>= 3.11) is required"; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "maturin>=1.9.4,<2" "uvloop>=0.19" "websockets>=14" "httptools>=0.6" \
		"redis[hiredis]>=5.0" "pytest>=8" "pytest-asyncio>=0.24" "pytest-timeout>=2.3" \
		"hypothesis>=6.100" "ruff>=0.6" "mypy>=1.11" "pusher==3.3.4" "pysher==1.0.8" "locust>=2.30" \
		"matplotlib>=3.8"
	touch $(STAMP)

# Builds the Rust extension in release mode and installs the package (editable) into the venv.
native: $(STAMP)
	@command -v cargo >/dev/null || { echo "cargo (Rust toolchain) is required: https://rustup.rs"; exit 1; }
	$(VENV)/bin/maturin develop --release --quiet

lint: setup
	$(VENV)/bin/ruff check gateway tests bench loadtests
	$(VENV)/bin/ruff format --check gateway tests bench loadtests
	$(VENV)/bin/mypy --strict gateway
	$(PY) -m mypy.stubtest gateway._native
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	cargo clippy --workspace --all-targets --features python --quiet -- -D warnings

fmt: setup
	$(VENV)/bin/ruff format gateway tests bench loadtests
	$(VENV)/bin/ruff check --fix gateway tests bench loadtests
	cargo fmt --all

# Benchmarks, including the side-by-side run against the peer (sockudo, built from crates.io by
# scripts/install-sockudo.sh into .work/peers: about 15 minutes the first time).
bench: setup peer
	$(PY) bench/run.py

peer:
	@bash scripts/install-sockudo.sh

# A wheel (with the compiled native module: installs without a Rust toolchain) and an sdist,
# in dist/.
dist: setup
	$(VENV)/bin/maturin build --release --sdist --out dist

clean:
	rm -rf $(VENV) target .pytest_cache .mypy_cache .ruff_cache
