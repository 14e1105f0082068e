# shellcheck shell=bash
# shellcheck disable=SC2034  # sourced: the scripts that source this file read its variables
# Sourced: the image names of the node's preload set and of cert-manager (needs kind-versions.sh first).
_kn_sum=$(cat "$REPO_ROOT/images/kindnet-lite/"* | sha256sum | cut -c1-10)
KINDNET_IMAGE="docker.io/blazen-fleet/kindnet-lite:$_kn_sum"
ETCD_IMAGE="registry.k8s.io/etcd:$ETCD_IMAGE_TAG"
COREDNS_IMAGE="registry.k8s.io/coredns/coredns:$COREDNS_IMAGE_TAG"
PAUSE_IMAGE="registry.k8s.io/pause:$PAUSE_IMAGE_TAG"
KIND_SANDBOX_IMAGE="registry.k8s.io/pause:3.10"   # kind v0.30.0's containerd sandbox_image; we point it at PAUSE_IMAGE
COMPONENT_IMAGES=(
  "registry.k8s.io/kube-apiserver:$K8S_VERSION" "registry.k8s.io/kube-controller-manager:$K8S_VERSION"
  "registry.k8s.io/kube-scheduler:$K8S_VERSION" "registry.k8s.io/kube-proxy:$K8S_VERSION"
  "$ETCD_IMAGE" "$COREDNS_IMAGE" "$PAUSE_IMAGE" "$KIND_SANDBOX_IMAGE" "$KINDNET_IMAGE"
)
COMPONENT_TAR="components-$K8S_VERSION-etcd$ETCD_IMAGE_TAG-coredns$COREDNS_IMAGE_TAG-$_kn_sum"
CERT_MANAGER_IMAGES=(
  "quay.io/jetstack/cert-manager-controller:$CERT_MANAGER_VERSION"
  "quay.io/jetstack/cert-manager-webhook:$CERT_MANAGER_VERSION"
  "quay.io/jetstack/cert-manager-cainjector:$CERT_MANAGER_VERSION"
)
CERT_MANAGER_TAR="cert-manager-$CERT_MANAGER_VERSION-scratch"
