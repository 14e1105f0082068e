# shellcheck shell=bash
# Shared settings for the toolchain scripts. Every artefact lives under one cache root, keyed by version,
# so a rerun finds it and does nothing.
set -euo pipefail

CACHE_ROOT="${BLAZEN_FLEET_CACHE:-$HOME/.cache/blazen-fleet}"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.5}"  # kubeadm v1.34.4 expects registry.k8s.io/etcd:3.6.5-0
HELM_VERSION="${HELM_VERSION:-v3.22.0}"

# Keep Go's module cache beside the build cache under ~/.cache, which survives between sessions.
export GOMODCACHE="${GOMODCACHE_OVERRIDE:-$CACHE_ROOT/gomod}"
export GOFLAGS="-mod=mod -buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
export CGO_ENABLED="${CGO_ENABLED:-0}"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
