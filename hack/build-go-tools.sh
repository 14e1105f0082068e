#!/usr/bin/env bash
# Builds the Go components of the kind toolchain from the Go module proxy, each cached under
# ~/.cache/blazen-fleet keyed by version (a rerun builds nothing):
#   kind, crictl (host: $CACHE_ROOT/bin)
#   containerd + ctr + shim, runc (cgo, seccomp), CNI plugins (node: $CACHE_ROOT/node-bits/<versions>)
#   coredns, pause (component images)
# Usage: hack/build-go-tools.sh [kind crictl containerd runc cni coredns pause]
source "$(dirname "$0")/kind-lib.sh"

gobuild() { # out-dir go-install-args...
  local out="$1"; shift
  mkdir -p "$out"
  GOBIN="$out" go install -trimpath "$@"
}

build_kind() {
  [[ -x "$TOOLS_BIN/kind-$KIND_VERSION" ]] && return 0
  gobuild "$CACHE_ROOT/kind-$KIND_VERSION" -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
  install -m 0755 "$CACHE_ROOT/kind-$KIND_VERSION/kind" "$TOOLS_BIN/kind-$KIND_VERSION"
  ln -sf "kind-$KIND_VERSION" "$TOOLS_BIN/kind"
}

# Builds main packages of a module that `go install pkg@version` can't take (replace/exclude directives, or a
# proxy that answers 403 instead of 404 for the longer module paths go tries first): a wrapper module requires
# it and repeats its exclude/replace blocks.  Usage: wrapper_build module version out-dir ldflags tags pkgs...
wrapper_build() {
  local mod="$1" ver="$2" out="$3" ldflags="$4" tags="$5"; shift 5
  local src; src="$CACHE_ROOT/wrappers/${mod//\//_}-$ver"
  mkdir -p "$src" "$out.tmp"
  local upstream; upstream=$(cd /tmp && go mod download -json "$mod@$ver" | jq -r .GoMod)
  { printf 'module blazen-fleet/wrapper\n\ngo 1.23\n\nrequire %s %s\n\n' "$mod" "$ver"
    sed -n '/^exclude (/,/^)/p; /^replace (/,/^)/p; /^exclude [^(]/p; /^replace [^(]/p' "$upstream"; } > "$src/go.mod"
  printf 'package wrapper\n' > "$src/doc.go"
  (cd "$src" && go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$out.tmp/" "$@")
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_crictl() {
  local out="$NODE_BITS/crictl-$CRICTL_VERSION"
  [[ -x "$out/crictl" ]] && return 0
  # kind calls it on the nodes (`kind load` checks `crictl inspecti` before importing an image; `kind export
  # logs`), and it is the first tool on call for a node: the real one, built like containerd.
  wrapper_build sigs.k8s.io/cri-tools "$CRICTL_VERSION" "$out" \
    "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" "" sigs.k8s.io/cri-tools/cmd/crictl
  ln -sf "$out/crictl" "$TOOLS_BIN/crictl"
}

build_containerd() {
  local out="$NODE_BITS/containerd-$CONTAINERD_VERSION"
  [[ -x "$out/containerd-shim-runc-v2" ]] && return 0
  local m=github.com/containerd/containerd/v2
  # containerd's go.mod has exclude directives, so `go install pkg@version` refuses it.
  wrapper_build "$m" "$CONTAINERD_VERSION" "$out" \
    "-s -w -X $m/version.Version=$CONTAINERD_VERSION -X $m/version.Revision=offline -X $m/version.Package=$m" \
    "no_aufs no_zfs no_btrfs no_devmapper" "$m/cmd/containerd" "$m/cmd/ctr" "$m/cmd/containerd-shim-runc-v2"
}

build_runc() {
  local out="$NODE_BITS/runc-$RUNC_VERSION"
  [[ -x "$out/runc" ]] && return 0
  ensure_apt gcc libc6-dev pkg-config libseccomp-dev
  CGO_ENABLED=1 gobuild "$out.tmp" -tags "seccomp urfave_cli_no_docs" \
    -ldflags "-s -w -X main.version=${RUNC_VERSION#v} -X main.gitCommit=offline" \
    "github.com/opencontainers/runc@$RUNC_VERSION"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_cni() {
  local out="$NODE_BITS/cni-$CNI_PLUGINS_VERSION"
  [[ -x "$out/portmap" ]] && return 0
  local m=github.com/containernetworking/plugins
  gobuild "$out.tmp" -ldflags "-s -w -X $m/pkg/utils/buildversion.BuildVersion=$CNI_PLUGINS_VERSION" \
    "$m/plugins/main/ptp@$CNI_PLUGINS_VERSION" "$m/plugins/main/loopback@$CNI_PLUGINS_VERSION" \
    "$m/plugins/ipam/host-local@$CNI_PLUGINS_VERSION" "$m/plugins/meta/portmap@$CNI_PLUGINS_VERSION"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_coredns() {
  local out="$CACHE_ROOT/coredns-$COREDNS_VERSION"
  [[ -x "$out/coredns" ]] && return 0
  gobuild "$out.tmp" -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_pause() {
  local out="$CACHE_ROOT/pause"
  local sum; sum=$(sha256sum "$REPO_ROOT/images/pause/main.go" | cut -c1-12)
  [[ -x "$out/pause-$sum" ]] && return 0
  mkdir -p "$out"
  (cd "$REPO_ROOT/images/pause" && go build -trimpath -ldflags "-s -w" -o "$out/pause-$sum" .)
  ln -sf "pause-$sum" "$out/pause"
}

for c in "${@:-kind crictl containerd runc cni pause coredns}"; do
  for cc in $c; do timed "go-$cc" "build_$cc"; done
done
