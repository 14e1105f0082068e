#!/usr/bin/env bash
# Builds ghz (the gRPC load generator `make bench` uses for latency distributions) from the Go module proxy into
# the shared cache, keyed by version: $CACHE_ROOT/bin/ghz -> ghz-$GHZ_VERSION.
source "$(dirname "$0")/lib.sh"

# v0.93.0 is the newest release the module proxy lists for github.com/bojand/ghz (later tags have no go.mod
# release on the proxy); pinned so a cold build next month builds the same binary.
GHZ_VERSION="${GHZ_VERSION:-v0.93.0}"
out="$CACHE_ROOT/bin"
if [[ -x "$out/ghz-$GHZ_VERSION" ]]; then ln -sf "ghz-$GHZ_VERSION" "$out/ghz"; log "ghz $GHZ_VERSION cached"; exit 0; fi
mkdir -p "$out"
tmp=$(mktemp -d "$out/.gobin.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log "ghz $GHZ_VERSION: building"
start=$SECONDS
GOFLAGS="-buildvcs=false" GOBIN="$tmp" go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
mv "$tmp/ghz" "$out/ghz-$GHZ_VERSION"
ln -sf "ghz-$GHZ_VERSION" "$out/ghz"
log "ghz $GHZ_VERSION: built in $((SECONDS - start)) s"
