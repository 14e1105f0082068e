# shellcheck shell=bash
# Sourced after kubeadm is built: reads the image tags kubeadm expects for $K8S_VERSION (no network with an
# explicit version) and exports them, so every component image is tagged exactly as kubeadm and kind expect.
#   KUBEADM_IMAGES (newline list), ETCD_IMAGE_TAG (3.6.x-0), ETCD_VERSION (v3.6.x), COREDNS_IMAGE_TAG, PAUSE_IMAGE_TAG
_kubeadm="$CACHE_ROOT/k8s-$K8S_VERSION/bin/kubeadm"
KUBEADM_IMAGES=$("$_kubeadm" config images list --kubernetes-version "$K8S_VERSION" 2>/dev/null)
ETCD_IMAGE_TAG=$(sed -n 's#^registry.k8s.io/etcd:##p' <<<"$KUBEADM_IMAGES")
COREDNS_IMAGE_TAG=$(sed -n 's#^registry.k8s.io/coredns/coredns:##p' <<<"$KUBEADM_IMAGES")
PAUSE_IMAGE_TAG=$(sed -n 's#^registry.k8s.io/pause:##p' <<<"$KUBEADM_IMAGES")
ETCD_VERSION="v${ETCD_IMAGE_TAG%-*}"
COREDNS_VERSION="$COREDNS_IMAGE_TAG"
export KUBEADM_IMAGES ETCD_IMAGE_TAG ETCD_VERSION COREDNS_IMAGE_TAG COREDNS_VERSION PAUSE_IMAGE_TAG
