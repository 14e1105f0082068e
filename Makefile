# The two commands the README promises: `make demo` (a local fleet on kind) and `make test` (every test).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo demo-down lint unit interop api e2e bench toolchain-api toolchain-kind

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[peer,operator,test]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: $(STAMP)
	$(PY) -m pytest tests/unit

interop: $(STAMP)
	$(PY) -m pytest tests/interop

# Real etcd, kube-apiserver and kube-controller-manager, built from Go modules and cached under ~/.cache.
toolchain-api:
	hack/build-k8s.sh kube-apiserver kube-controller-manager
	hack/build-etcd.sh

api: $(STAMP) toolchain-api
	$(PY) -m pytest tests/api

test: lint toolchain-api
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) -m bench

# The offline kind toolchain (Go modules + Debian packages, cached under ~/.cache/blazen-fleet): docs/cluster.md.
toolchain-kind:
	hack/docker-up.sh
	hack/build-toolchain.sh
	hack/build-node-image.sh
	hack/build-images.sh

demo: $(STAMP)
	hack/demo.sh

demo-down:
	hack/kind-down.sh

# End-to-end tests on the kind cluster (brought up, or reused, by the session fixture through hack/kind-up.sh).
e2e: $(STAMP)
	BLAZEN_E2E=1 $(PY) -m pytest -m e2e tests/e2e
