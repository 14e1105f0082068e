# Shared settings for the kind toolchain (hack/kind-*.sh, hack/build-*.sh of the cluster side).
# Sources lib.sh for the cache root, Go settings and the k8s/etcd versions.
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HACK_DIR/.." && pwd)"

KIND_VERSION="${KIND_VERSION:-v0.30.0}"
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.1.4}"
RUNC_VERSION="${RUNC_VERSION:-v1.3.0}"
CRICTL_VERSION="${CRICTL_VERSION:-v1.30.0}"   # the newest cri-tools the module proxy here serves (kind ships v1.33.0)
CNI_PLUGINS_VERSION="${CNI_PLUGINS_VERSION:-v1.7.1}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.12.1}"
# kindnetd is a nested module without tags; this commit is the one behind kindest/kindnetd:v20250512-df8de77b.
KINDNETD_COMMIT="${KINDNETD_COMMIT:-df8de77b}"
KINDNETD_TAG="${KINDNETD_TAG:-v20250512-df8de77b}"
CERT_MANAGER_VERSION="${CERT_MANAGER_VERSION:-v1.11.5}"
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
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "apt: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

docker_image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# Loads an image from its cached tarball when the Docker store lacks it. Returns 1 if neither has it.
image_from_cache() {
  local ref="$1" tar="$IMAGES_DIR/$2.tar"
  docker_image_exists "$ref" && return 0
  if [[ -f "$tar" ]]; then
    log "docker load $tar"
    docker load -i "$tar" >/dev/null && docker_image_exists "$ref" && return 0
  fi
  return 1
}

# Saves images into the cache (name without .tar).
image_to_cache() {
  local name="$1"; shift
  docker save -o "$IMAGES_DIR/$name.tar.tmp" "$@"
  mv "$IMAGES_DIR/$name.tar.tmp" "$IMAGES_DIR/$name.tar"
}

# The nodes ordinary pods can land on (no NoSchedule/NoExecute taint), comma-separated, for `kind load --nodes`:
# loading an image only where it can run saves most of the load time.
schedulable_nodes() {
  kubectl get nodes -o json | jq -r '[.items[] | select([.spec.taints[]? | select(.effect != "PreferNoSchedule")] | length == 0)
    | .metadata.name] | join(",")'
}
