#!/usr/bin/env bash
# Builds the kwok controller (sigs.k8s.io/kwok: fake nodes and pods against a real API server, no kubelet) from
# the Go module proxy for the operator scale benchmark (`make bench-operator`). Cached under
# $CACHE_ROOT/kwok-$KWOK_VERSION/bin/kwok; a rerun does nothing.
# Usage: hack/build-kwok.sh
source "$(dirname "$0")/kind-lib.sh"

out="$CACHE_ROOT/kwok-$KWOK_VERSION/bin"
if [[ -x "$out/kwok" ]]; then log "kwok $KWOK_VERSION cached"; exit 0; fi
mkdir -p "$out"
tmp=$(mktemp -d "$out/.gobin.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log "kwok $KWOK_VERSION: building"
start=$SECONDS
# kwok's go.mod has no replace/exclude directives, so `go install pkg@version` takes it as released.
GOFLAGS="-buildvcs=false" GOBIN="$tmp" go install -trimpath \
  -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
mv "$tmp/kwok" "$out/kwok"
log "kwok $KWOK_VERSION: built in $((SECONDS - start)) s"
