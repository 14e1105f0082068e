#!/usr/bin/env bash
# Builds etcd from the Go module proxy. etcd's server module carries replace directives, so `go install` refuses
# it; a wrapper module that requires the sibling modules at the same tag builds the same binary.
source "$(dirname "$0")/lib.sh"

out="$CACHE_ROOT/etcd-$ETCD_VERSION/bin"
src="$CACHE_ROOT/etcd-$ETCD_VERSION/src"
if [[ -x "$out/etcd" ]]; then log "etcd $ETCD_VERSION cached"; exit 0; fi
mkdir -p "$out" "$src"

cat > "$src/go.mod" <<MOD
module blazen-fleet/etcd-wrapper

go 1.24

require (
	go.etcd.io/etcd/server/v3 $ETCD_VERSION
	go.etcd.io/etcd/api/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/v3 $ETCD_VERSION
	go.etcd.io/etcd/pkg/v3 $ETCD_VERSION
)
MOD
printf 'package wrapper\n' > "$src/doc.go"

cd "$src"
log "etcd $ETCD_VERSION: building"
start=$SECONDS
go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" go.etcd.io/etcd/server/v3
mv "$out/etcd.tmp" "$out/etcd"
log "etcd $ETCD_VERSION: built in $((SECONDS - start)) s"
