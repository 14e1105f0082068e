#!/usr/bin/env bash
# Builds the Debian bookworm base images with mmdebstrap (network to Debian's mirror only) and imports them
# into Docker, caching each as a `docker save` tarball:
#   blazen-fleet/kind-base-rootfs:bookworm  the kind node userland (kind v0.30.0 images/base package list)
#   blazen-fleet/net-base:bookworm          iptables/nftables/conntrack for kube-proxy and kindnetd
#   blazen-fleet/python-base:bookworm       python3 + venv for our own images
# Usage: hack/build-rootfs.sh [node|net|python ...]   (default: all three)
source "$(dirname "$0")/kind-lib.sh"

ensure_apt mmdebstrap

declare -A PKGS=(
  [node]="systemd conntrack iptables nftables iproute2 ethtool util-linux mount kmod libseccomp2 pigz bash ca-certificates curl jq procps"
  [net]="iptables nftables conntrack iproute2 curl jq ca-certificates"
  [python]="python3 python3-venv ca-certificates tini"
)
declare -A REF=(
  [node]="blazen-fleet/kind-base-rootfs:$DEBIAN_SUITE"
  [net]="blazen-fleet/net-base:$DEBIAN_SUITE"
  [python]="blazen-fleet/python-base:$DEBIAN_SUITE"
)

current() { # ref hash: is the image in the store, built from this package list?
  docker image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$1" 2>/dev/null | grep -qx "BLAZEN_ROOTFS=$2"
}

build_one() {
  local kind="$1" ref="${REF[$1]}"
  local hash; hash=$(printf '%s %s' "$DEBIAN_SUITE" "${PKGS[$kind]}" | sha256sum | cut -c1-10)
  local cache="rootfs-$kind-$DEBIAN_SUITE-$hash"
  if current "$ref" "$hash"; then log "$ref cached"; return 0; fi
  if [[ -f "$IMAGES_DIR/$cache.tar" ]]; then
    docker load -i "$IMAGES_DIR/$cache.tar" >/dev/null
    if current "$ref" "$hash"; then log "$ref loaded from $cache.tar"; return 0; fi
  fi
  local tar; tar=$(mktemp -d)/rootfs.tar
  log "mmdebstrap $kind: ${PKGS[$kind]}"
  # shellcheck disable=SC2016  # "$1" belongs to the hook: mmdebstrap's shell expands it, not this one
  mmdebstrap --quiet --variant=minbase --aptopt='Apt::Install-Recommends "false"' \
    --include="${PKGS[$kind]// /,}" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/usr/share/doc/* "$1"/usr/share/man/*' \
    "$DEBIAN_SUITE" "$tar" "$DEBIAN_MIRROR"
  local changes=(--change "ENV BLAZEN_ROOTFS=$hash")
  if [[ "$kind" == node ]]; then
    # STOPSIGNAL is not an import change on Docker 20.10; hack/build-node-image.sh's Dockerfile sets it.
    changes+=(--change 'ENV container=docker'
              --change 'ENTRYPOINT ["/usr/local/bin/entrypoint","/sbin/init"]')
  else
    changes+=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
  fi
  docker import "${changes[@]}" "$tar" "$ref" >/dev/null
  rm -rf "$(dirname "$tar")"
  image_to_cache "$cache" "$ref"
}

for k in "${@:-node net python}"; do
  for kk in $k; do timed "rootfs-$kk" build_one "$kk"; done
done
