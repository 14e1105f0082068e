#!/usr/bin/env bash
# Builds ghz (the gRPC load generator used by `make bench`) from the Go module proxy into the shared cache.
source "$(dirname "$0")/lib.sh"

GHZ_VERSION="${GHZ_VERSION:-latest}"
out="$CACHE_ROOT/bin"
if [[ -x "$out/ghz" ]]; then log "ghz cached at $out/ghz"; exit 0; fi
mkdir -p "$out"
log "ghz $GHZ_VERSION: building"
start=$SECONDS
GOBIN="$out" go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
log "ghz: built in $((SECONDS - start)) s"
