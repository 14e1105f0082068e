#!/usr/bin/env bash
# Brings up (or reuses) the offline kind cluster: Docker (+ capability wrapper), the cached toolchain, the node
# image, a 3-node cluster (control plane, CPU worker, GPU-pool worker with a fake nvidia.com/gpu: 4), and
# cert-manager. Idempotent: a running, healthy cluster is reused in seconds.
# Env: CLUSTER_NAME (blazen), KUBECONFIG (default ~/.cache/blazen-fleet/kind-<name>.kubeconfig),
#      SKIP_CERT_MANAGER=1 to stop after the nodes are Ready.
source "$(dirname "$0")/kind-lib.sh"
export KUBECONFIG="${KUBECONFIG:-$CACHE_ROOT/kind-$CLUSTER_NAME.kubeconfig}"
t0=$SECONDS

"$HACK_DIR/toolchain-kind.sh"

GPU_NODE="$CLUSTER_NAME-worker2"
cluster_config() {
  cat <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
name: $CLUSTER_NAME
nodes:
- role: control-plane
- role: worker
  labels:
    blazen.dev/pool: cpu
- role: worker
  labels:
    blazen.dev/pool: gpu
    nvidia.com/gpu.present: "true"
  kubeadmConfigPatches:
  - |
    kind: JoinConfiguration
    nodeRegistration:
      taints:
      - key: nvidia.com/gpu
        value: present
        effect: NoSchedule
YAML
}

healthy() { kubectl get --raw /readyz >/dev/null 2>&1; }

create_cluster() {
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
    # Containers stopped (e.g. dockerd restarted): start them and give the API a moment.
    local c; for c in $(docker ps -a --filter "label=io.x-k8s.kind.cluster=$CLUSTER_NAME" --filter status=exited -q); do
      docker start "$c" >/dev/null
    done
    kind export kubeconfig --name "$CLUSTER_NAME" --kubeconfig "$KUBECONFIG" >/dev/null 2>&1 || true
    for _ in $(seq 30); do healthy && break; sleep 2; done
    if healthy && [[ "$(docker inspect -f '{{.Image}}' "$CLUSTER_NAME-control-plane")" == \
                     "$(docker image inspect -f '{{.Id}}' "$NODE_IMAGE")" ]]; then
      log "reusing kind cluster $CLUSTER_NAME"; return 0
    fi
    log "kind cluster $CLUSTER_NAME is unhealthy or from another node image: recreating"
    kind delete cluster --name "$CLUSTER_NAME" --kubeconfig "$KUBECONFIG"
  fi
  log "creating kind cluster $CLUSTER_NAME ($NODE_IMAGE)"
  cluster_config | kind create cluster --image "$NODE_IMAGE" --config - --kubeconfig "$KUBECONFIG" --wait 5m
}

# Extended resources are not managed by kubelet: patching node status is the documented way to advertise one,
# and it sticks. Re-applied (idempotent) on every run and checked.
fake_gpus() {
  for _ in $(seq 10); do
    kubectl patch node "$GPU_NODE" --subresource=status --type=json \
      -p '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"4"}]' >/dev/null
    sleep 1
    [[ "$(kubectl get node "$GPU_NODE" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')" == 4 ]] && return 0
  done
  log "error: $GPU_NODE does not report nvidia.com/gpu: 4"; return 1
}

timed cluster-create create_cluster
kubectl wait node --all --for=condition=Ready --timeout=300s >/dev/null
timed gpu-capacity fake_gpus
source "$HACK_DIR/kind-versions.sh"; source "$HACK_DIR/kind-images.sh"
timed load-cert-manager-images kind load docker-image --name "$CLUSTER_NAME" --nodes "$(schedulable_nodes)" \
  "${CERT_MANAGER_IMAGES[@]}"
[[ -n "${SKIP_CERT_MANAGER:-}" ]] || timed cert-manager-install "$HACK_DIR/install-cert-manager.sh"
kubectl get nodes -L blazen.dev/pool -o wide
record_time cluster-up-total $((SECONDS - t0))
log "cluster $CLUSTER_NAME up in $((SECONDS - t0)) s; export KUBECONFIG=$KUBECONFIG"
