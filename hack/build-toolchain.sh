#!/usr/bin/env bash
# The one serial build queue for the kind toolchain (2 cores: never two heavy Go builds at once).
# Every step is cached under ~/.cache/blazen-fleet keyed by version, so a rerun does nothing.
# Wall times go to ~/.cache/blazen-fleet/logs/times.tsv.
source "$(dirname "$0")/kind-lib.sh"

t_start=$SECONDS
# Another build-k8s.sh may be running (e.g. `make toolchain-api`): when we still need to build Kubernetes
# binaries ourselves, wait for it rather than compete for the 2 cores (and then find its binaries cached).
k8s_missing=false
for b in kubeadm kubelet kubectl kube-scheduler kube-proxy kube-apiserver kube-controller-manager; do
  [[ -x "$CACHE_ROOT/k8s-$K8S_VERSION/bin/$b" ]] || k8s_missing=true
done
while $k8s_missing && [[ -z "${BLAZEN_NO_WAIT:-}" ]] && pgrep -f 'hack/build-k8s.sh|[ /]build-k8s.sh' >/dev/null; do
  log "waiting for a running build-k8s.sh to finish"; sleep 20
done

timed k8s-binaries "$HACK_DIR/build-k8s.sh" kubeadm kubelet kubectl kube-scheduler kube-proxy kube-apiserver kube-controller-manager
source "$HACK_DIR/kind-versions.sh"   # etcd/coredns/pause tags as kubeadm expects them
timed etcd env ETCD_VERSION="$ETCD_VERSION" "$HACK_DIR/build-etcd.sh"
timed go-tools "$HACK_DIR/build-go-tools.sh" kind containerd runc cni crictl pause coredns
timed helm "$HACK_DIR/build-helm.sh" >/dev/null
timed cert-manager "$HACK_DIR/build-cert-manager.sh"
timed kwok "$HACK_DIR/build-kwok.sh"
timed ghz "$HACK_DIR/build-ghz.sh"
record_time toolchain-total $((SECONDS - t_start))
log "toolchain ready in $((SECONDS - t_start)) s"
