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
  [net]="iptables nftables conntrack ca-certificates"
  [python]="python3 python3-venv ca-certificates tini"
)
declare -A REF=(
  [node]="blazen-fleet/kind-base-rootfs:$DEBIAN_SUITE"
  [net]="blazen-fleet/net-base:$DEBIAN_SUITE"
  [python]="blazen-fleet/python-base:$DEBIAN_SUITE"
)

build_one() {
  local kind="$1" ref="${REF[$1]}"
  if image_from_cache "$ref" "rootfs-$kind-$DEBIAN_SUITE"; then log "$ref cached"; return 0; fi
  local tar; tar=$(mktemp -d)/rootfs.tar
  log "mmdebstrap $kind: ${PKGS[$kind]}"
  mmdebstrap --quiet --variant=minbase --aptopt='Apt::Install-Recommends "false"' \
    --include="${PKGS[$kind]// /,}" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/usr/share/doc/* "$1"/usr/share/man/*' \
    "$DEBIAN_SUITE" "$tar" "$DEBIAN_MIRROR"
  local changes=()
  if [[ "$kind" == node ]]; then
    # STOPSIGNAL is not an import change on Docker 20.10; hack/build-node-image.sh's Dockerfile sets it.
    changes=(--change 'ENV container=docker'
             --change 'ENTRYPOINT ["/usr/local/bin/entrypoint","/sbin/init"]')
  else
    changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
  fi
  docker import "${changes[@]}" "$tar" "$ref" >/dev/null
  rm -rf "$(dirname "$tar")"
  image_to_cache "rootfs-$kind-$DEBIAN_SUITE" "$ref"
}

for k in "${@:-node net python}"; do
  for kk in $k; do timed "rootfs-$kk" build_one "$kk"; done
done
