#!/usr/bin/env bash
# Builds the images preloaded into the kind node -- exactly the tags kubeadm $K8S_VERSION and kind expect --
# with Docker's classic builder and no pulls (FROM scratch, or FROM our own bookworm rootfs images):
#   registry.k8s.io/kube-{apiserver,controller-manager,scheduler,proxy}:$K8S_VERSION
#   registry.k8s.io/etcd:<kubeadm's tag>   registry.k8s.io/coredns/coredns:<kubeadm's tag>
#   registry.k8s.io/pause:<kubeadm's tag> and :3.10 (kind's sandbox_image)   blazen-fleet/kindnet-lite:<hash>
# and the cert-manager images quay.io/jetstack/cert-manager-{controller,webhook,cainjector}:$CERT_MANAGER_VERSION.
# Saved as one tarball per set under ~/.cache/blazen-fleet/images (a wiped Docker store reloads from there).
# Prints nothing; hack/build-node-image.sh reads the same variables.
source "$(dirname "$0")/kind-lib.sh"
source "$HACK_DIR/kind-versions.sh"
source "$HACK_DIR/kind-images.sh"

k8s_bin="$CACHE_ROOT/k8s-$K8S_VERSION/bin"

build_ctx() { # tag dockerfile-text files...
  local tag="$1" df="$2"; shift 2
  local ctx; ctx=$(mktemp -d)
  local f; for f in "$@"; do cp -L "$f" "$ctx/"; done
  printf '%s\n' "$df" > "$ctx/Dockerfile"
  docker build -q -t "$tag" "$ctx" >/dev/null
  rm -rf "$ctx"
}

scratch_bin() { # tag binary
  build_ctx "$1" "FROM scratch
COPY $(basename "$2") /usr/local/bin/
ENV PATH=/usr/local/bin:/usr/bin:/bin" "$2"
}

component_images() {
  if image_from_cache "${COMPONENT_IMAGES[0]}" "$COMPONENT_TAR" &&
     for i in "${COMPONENT_IMAGES[@]}"; do docker_image_exists "$i" || exit 1; done; then
    log "component images cached"; return 0
  fi
  "$HACK_DIR/build-rootfs.sh" net
  for b in kube-apiserver kube-controller-manager kube-scheduler; do
    scratch_bin "registry.k8s.io/$b:$K8S_VERSION" "$k8s_bin/$b"
  done
  scratch_bin "$ETCD_IMAGE" "$CACHE_ROOT/etcd-$ETCD_VERSION/bin/etcd"
  build_ctx "registry.k8s.io/kube-proxy:$K8S_VERSION" "FROM blazen-fleet/net-base:$DEBIAN_SUITE
COPY kube-proxy /usr/local/bin/" "$k8s_bin/kube-proxy"
  build_ctx "$COREDNS_IMAGE" 'FROM scratch
COPY coredns /coredns
EXPOSE 53 53/udp
ENTRYPOINT ["/coredns"]' "$CACHE_ROOT/coredns-$COREDNS_VERSION/coredns"
  build_ctx "$PAUSE_IMAGE" 'FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]' "$CACHE_ROOT/pause/pause"
  docker tag "$PAUSE_IMAGE" "$KIND_SANDBOX_IMAGE"
  build_ctx "$KINDNET_IMAGE" "$(cat "$REPO_ROOT/images/kindnet-lite/Dockerfile")" \
    "$REPO_ROOT/images/kindnet-lite/kindnet-lite.sh"
  image_to_cache "$COMPONENT_TAR" "${COMPONENT_IMAGES[@]}"
}

cert_manager_images() {
  if image_from_cache "${CERT_MANAGER_IMAGES[0]}" "$CERT_MANAGER_TAR" &&
     for i in "${CERT_MANAGER_IMAGES[@]}"; do docker_image_exists "$i" || exit 1; done; then
    log "cert-manager images cached"; return 0
  fi
  "$HACK_DIR/build-rootfs.sh" net
  local b
  for b in controller webhook cainjector; do
    # The bookworm "net" rootfs supplies /etc/ssl/certs (ACME issuers need them) and /tmp.
    build_ctx "quay.io/jetstack/cert-manager-$b:$CERT_MANAGER_VERSION" "FROM blazen-fleet/net-base:$DEBIAN_SUITE
COPY $b /app/cmd/$b
USER 1000:1000
ENTRYPOINT [\"/app/cmd/$b\"]" "$CACHE_ROOT/cert-manager-$CERT_MANAGER_VERSION/bin/$b"
  done
  image_to_cache "$CERT_MANAGER_TAR" "${CERT_MANAGER_IMAGES[@]}"
}

for s in "${@:-components cert-manager}"; do
  case "$s" in
    components) timed images-components component_images ;;
    cert-manager) timed images-cert-manager cert_manager_images ;;
  esac
done
