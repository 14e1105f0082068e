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

build_crictl() {
  local out="$NODE_BITS/crictl-$CRICTL_VERSION"
  [[ -x "$out/crictl" ]] && return 0
  gobuild "$out" -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
    "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
  ln -sf "$out/crictl" "$TOOLS_BIN/crictl"
}

build_containerd() {
  local out="$NODE_BITS/containerd-$CONTAINERD_VERSION"
  [[ -x "$out/containerd-shim-runc-v2" ]] && return 0
  local m=github.com/containerd/containerd/v2
  gobuild "$out.tmp" -tags "no_aufs no_zfs no_btrfs no_devmapper" \
    -ldflags "-s -w -X $m/version.Version=$CONTAINERD_VERSION -X $m/version.Revision=offline -X $m/version.Package=$m" \
    "$m/cmd/containerd@$CONTAINERD_VERSION" "$m/cmd/ctr@$CONTAINERD_VERSION" \
    "$m/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
  rm -rf "$out"; mv "$out.tmp" "$out"
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
