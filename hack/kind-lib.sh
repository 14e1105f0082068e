# shellcheck shell=bash
# shellcheck disable=SC2034  # sourced: the scripts that source this file read its variables
# Shared settings for the kind toolchain (hack/kind-*.sh, hack/build-*.sh of the cluster side).
# Sources lib.sh for the cache root, Go settings and the k8s/etcd versions.
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HACK_DIR/.." && pwd)"

KIND_VERSION="${KIND_VERSION:-v0.30.0}"
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.1.4}"
RUNC_VERSION="${RUNC_VERSION:-v1.3.0}"
CRICTL_VERSION="${CRICTL_VERSION:-v1.34.0}"   # matches K8S_VERSION's minor (kind v0.30.0 ships v1.33.0)
CNI_PLUGINS_VERSION="${CNI_PLUGINS_VERSION:-v1.7.1}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.12.1}"
# kindnetd is a nested module without tags; this commit is the one behind kindest/kindnetd:v20250512-df8de77b.
KINDNETD_COMMIT="${KINDNETD_COMMIT:-df8de77b}"
KINDNETD_TAG="${KINDNETD_TAG:-v20250512-df8de77b}"
CERT_MANAGER_VERSION="${CERT_MANAGER_VERSION:-v1.11.5}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"   # fake nodes/pods for the operator scale benchmark (bench/operator.py)
PAUSE_TAGS="${PAUSE_TAGS:-3.10 3.10.1}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

# The node image's tag carries every input version, so a change of any of them builds a new one.
NODE_IMAGE="${NODE_IMAGE:-kindest/node:${K8S_VERSION}-blazen-offline}"
CLUSTER_NAME="${CLUSTER_NAME:-blazen}"

TOOLS_BIN="$CACHE_ROOT/bin"          # kind, helm, crictl ... (host tools)
NODE_BITS="$CACHE_ROOT/node-bits"    # containerd, runc, CNI plugins for the node image
IMAGES_DIR="$CACHE_ROOT/images"      # docker save tarballs
LOG_DIR="$CACHE_ROOT/logs"
TIMES_FILE="$LOG_DIR/times.tsv"
mkdir -p "$TOOLS_BIN" "$NODE_BITS" "$IMAGES_DIR" "$LOG_DIR"
export PATH="$TOOLS_BIN:$CACHE_ROOT/k8s-$K8S_VERSION/bin:$PATH"
# Debian's docker.io 20.10 has no buildx; the classic builder never pulls for FROM scratch / FROM <local tag>.
export DOCKER_BUILDKIT=0

# Records "<step>\t<seconds>\t<date>" so docs/cluster.md can quote measured times.
record_time() { printf '%s\t%s\t%s\n' "$1" "$2" "$(date -u +%FT%TZ)" >> "$TIMES_FILE"; }

# Runs a step, logs its wall time and records it.
timed() {
  local name="$1"; shift
  local t0=$SECONDS
  "$@"
  local dt=$((SECONDS - t0))
  log "$name: ${dt}s"
  record_time "$name" "$dt"
}

# Installs Debian packages that are missing (dpkg-query), running apt-get update at most once per call.
ensure_apt() {
  local wanting=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || wanting+=("$p")
  done
  ((${#wanting[@]} == 0)) && return 0
  log "apt: installing ${wanting[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${wanting[@]}" >/dev/null
}

docker_image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# The cache's tar names are <family>-<key>, the key being the hash/version part the writer derives from its
# inputs. One anchored ERE per layout, family in group 1 and key in group 2; the key's shape ends the family, so
# app-peer-runtime-<hash> and a hypothetical app-peer-runtime-extra-<hash> are two families. A name that matches
# no layout is never pruned (image_to_cache logs it).
IMAGE_CACHE_LAYOUTS=(
  '^(app-[a-z0-9-]+)-([0-9a-f]{12})$'              # build-app-images.sh: app-<image>-<src hash>
  '^(rootfs-[a-z0-9-]+)-([a-z]+-[0-9a-f]{10})$'    # build-rootfs.sh: rootfs-<kind>-<suite>-<package hash>
  '^(node)-(v[0-9.]+-[0-9a-f]{10})$'               # build-node-image.sh: node-<k8s>-<bits hash>
  '^(components)-(v[0-9.]+-etcd[0-9.]+-[0-9]+-corednsv[0-9.]+-[0-9a-f]{10})$'    # kind-images.sh COMPONENT_TAR
  '^(cert-manager)-(v[0-9.]+-scratch)$'            # kind-images.sh CERT_MANAGER_TAR
)

# Prints the family of a cache tar name (without .tar); fails when no layout matches.
image_cache_family() {
  local re
  for re in "${IMAGE_CACHE_LAYOUTS[@]}"; do
    if [[ "$1" =~ $re ]]; then printf '%s\n' "${BASH_REMATCH[1]}"; return 0; fi
  done
  return 1
}

# Saves images into the cache (name without .tar), then removes the other tars of the same family (another
# key: stale versions), so the cache holds one tar per family. The old tars go only once the new one is in place.
image_to_cache() {
  local name="$1"; shift
  docker save -o "$IMAGES_DIR/$name.tar.tmp" "$@"
  mv "$IMAGES_DIR/$name.tar.tmp" "$IMAGES_DIR/$name.tar"
  local family f other
  if ! family=$(image_cache_family "$name"); then
    log "warning: $name.tar matches no layout in IMAGE_CACHE_LAYOUTS (hack/kind-lib.sh); older versions kept"
    return 0
  fi
  for f in "$IMAGES_DIR/$family"-*.tar; do
    other=$(basename "$f" .tar)
    [[ -f "$f" && "$other" != "$name" && "$(image_cache_family "$other" || true)" == "$family" ]] || continue
    log "image cache: removing $other.tar (superseded by $name.tar)"
    rm -f -- "$f"
  done
}

# The nodes ordinary pods can land on (no NoSchedule/NoExecute taint), comma-separated, for `kind load --nodes`:
# loading an image only where it can run saves most of the load time.
schedulable_nodes() {
  kubectl get nodes -o json | jq -r '[.items[] | select([.spec.taints[]? | select(.effect != "PreferNoSchedule")] | length == 0)
    | .metadata.name] | join(",")'
}
