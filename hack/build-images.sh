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

all_present() { local i; for i in "$@"; do docker_image_exists "$i" || return 1; done; }

scratch_bin() { # tag binary
  build_ctx "$1" "FROM scratch
COPY $(basename "$2") /usr/local/bin/
ENV PATH=/usr/local/bin:/usr/bin:/bin" "$2"
}

component_images() {
  # The tarball's name carries every input version: without it the images are rebuilt, whatever the store has.
  if [[ -f "$IMAGES_DIR/$COMPONENT_TAR.tar" ]] && all_present "${COMPONENT_IMAGES[@]}" ||
     { [[ -f "$IMAGES_DIR/$COMPONENT_TAR.tar" ]] && docker load -i "$IMAGES_DIR/$COMPONENT_TAR.tar" >/dev/null &&
       all_present "${COMPONENT_IMAGES[@]}"; }; then
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
    "$REPO_ROOT/images/kindnet-lite/kindnet-lite.sh" "$REPO_ROOT/images/kindnet-lite/netpol.py"
  image_to_cache "$COMPONENT_TAR" "${COMPONENT_IMAGES[@]}"
}

cert_manager_images() {
  if [[ -f "$IMAGES_DIR/$CERT_MANAGER_TAR.tar" ]] && all_present "${CERT_MANAGER_IMAGES[@]}" ||
     { [[ -f "$IMAGES_DIR/$CERT_MANAGER_TAR.tar" ]] && docker load -i "$IMAGES_DIR/$CERT_MANAGER_TAR.tar" >/dev/null &&
       all_present "${CERT_MANAGER_IMAGES[@]}"; }; then
    log "cert-manager images cached"; return 0
  fi
  local b ctx
  for b in controller webhook cainjector; do
    # FROM scratch like upstream's distroless images: the static binary plus a CA bundle (ACME issuers).
    ctx=$(mktemp -d)
    mkdir -p "$ctx/etc/ssl/certs"
    cp "$CACHE_ROOT/cert-manager-$CERT_MANAGER_VERSION/bin/$b" "$ctx/"
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/etc/ssl/certs/"
    printf '%s\n' "FROM scratch" "COPY etc/ /etc/" "COPY $b /app/cmd/$b" "USER 1000:1000" \
      "ENTRYPOINT [\"/app/cmd/$b\"]" > "$ctx/Dockerfile"
    docker build -q -t "quay.io/jetstack/cert-manager-$b:$CERT_MANAGER_VERSION" "$ctx" >/dev/null
    rm -rf "$ctx"
  done
  image_to_cache "$CERT_MANAGER_TAR" "${CERT_MANAGER_IMAGES[@]}"
}

steps=("$@")
[[ $# -gt 0 ]] || steps=(components cert-manager)
for s in "${steps[@]}"; do
  case "$s" in
    components) timed images-components component_images ;;
    cert-manager) timed images-cert-manager cert_manager_images ;;
  esac
done
