#!/usr/bin/env bash
# Builds cert-manager's controller, webhook and cainjector from the Go module proxy.
#
# Since v1.12 the binaries live in separate modules (cmd/controller is module .../controller-binary with a
# replace to ../../) that the proxy cannot serve; this script first probes that route for the newest release
# (so the record stays honest when a proxy starts serving it), then builds v1.11.5 -- the last release whose
# cmd/* are packages of the root module -- through a wrapper module that repeats upstream's replace lines.
source "$(dirname "$0")/kind-lib.sh"

out="$CACHE_ROOT/cert-manager-$CERT_MANAGER_VERSION/bin"
src="$CACHE_ROOT/cert-manager-$CERT_MANAGER_VERSION/src"
if [[ -x "$out/cainjector" && -x "$out/webhook" && -x "$out/controller" ]]; then
  log "cert-manager $CERT_MANAGER_VERSION cached"; exit 0
fi
mkdir -p "$out" "$src"

probe_new() {
  local latest
  latest=$(go list -m -versions github.com/cert-manager/cert-manager 2>/dev/null | tr ' ' '\n' | grep -E '^v1\.[0-9]+\.[0-9]+$' | sort -V | tail -1)
  log "probe: cert-manager $latest binary modules through the proxy"
  for m in controller-binary cmd/controller; do
    if go list -m -json "github.com/cert-manager/cert-manager/$m@$latest" >/dev/null 2>>"$LOG_DIR/cert-manager-probe.log"; then
      log "probe: github.com/cert-manager/cert-manager/$m@$latest resolves (not used; see docs/cluster.md)"
    else
      log "probe: github.com/cert-manager/cert-manager/$m@$latest is not served (see $LOG_DIR/cert-manager-probe.log)"
    fi
  done
}
probe_new || true

upstream_mod=$(cd /tmp && go mod download -json "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION" | jq -r .GoMod)
{
  echo "module blazen-fleet/cert-manager-wrapper"
  echo
  echo "go 1.20"
  echo
  echo "require github.com/cert-manager/cert-manager $CERT_MANAGER_VERSION"
  echo
  grep -E '^replace |^\s+\S+ (v\S+ )?=> ' "$upstream_mod" | sed 's/^replace //; s/^\s*//' | sed 's/^/replace /'
} > "$src/go.mod"
printf 'package wrapper\n' > "$src/doc.go"

cd "$src"
ldflags="-s -w -X github.com/cert-manager/cert-manager/pkg/util.AppVersion=$CERT_MANAGER_VERSION"
ldflags+=" -X github.com/cert-manager/cert-manager/pkg/util.AppGitCommit=offline"
for b in controller webhook cainjector; do
  [[ -x "$out/$b" ]] && continue
  log "cert-manager $CERT_MANAGER_VERSION: building $b"
  t0=$SECONDS
  go build -trimpath -ldflags "$ldflags" -o "$out/$b.tmp" "github.com/cert-manager/cert-manager/cmd/$b"
  mv "$out/$b.tmp" "$out/$b"
  log "cert-manager: $b built in $((SECONDS - t0)) s"
done
