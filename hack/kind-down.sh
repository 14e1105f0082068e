#!/usr/bin/env bash
# Deletes the kind cluster (everything in it goes with the node containers). Caches and images stay.
source "$(dirname "$0")/kind-lib.sh"
export KUBECONFIG="${KUBECONFIG:-$CACHE_ROOT/kind-$CLUSTER_NAME.kubeconfig}"
if command -v kind >/dev/null && docker info >/dev/null 2>&1; then
  kind delete cluster --name "$CLUSTER_NAME" --kubeconfig "$KUBECONFIG"
fi
rm -f "$KUBECONFIG"
