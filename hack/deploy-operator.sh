#!/usr/bin/env bash
# Builds our images (hack/build-app-images.sh), loads them into every kind node and installs (or upgrades) the
# operator with helm/blazen-operator, image values pointing at the local tags with pullPolicy Never.
# Needs the cluster from hack/kind-up.sh.
source "$(dirname "$0")/kind-lib.sh"
export KUBECONFIG="${KUBECONFIG:-$CACHE_ROOT/kind-$CLUSTER_NAME.kubeconfig}"
OP_NS="${OPERATOR_NAMESPACE:-blazen-system}"
# OPERATOR_IMAGE overrides the operator image (repository:tag) that is loaded and installed.
OPERATOR_IMAGE="${OPERATOR_IMAGE:-blazen-fleet/operator:dev}"

"$HACK_DIR/build-app-images.sh"
# One `kind load` of both images (one tarball: the shared python layers go once) onto the workers, where they
# can run (the operator on a schedulable node, the example steps there and on the GPU pool). kind skips images a
# node already has with the same id (`crictl inspecti` on the node).
workers=$(kind get nodes --name "$CLUSTER_NAME" | grep -v control-plane | paste -sd, -)
timed load-app-images kind load docker-image --name "$CLUSTER_NAME" --nodes "$workers" \
  "$OPERATOR_IMAGE" blazen-fleet/example-steps:dev

helm=$("$HACK_DIR/build-helm.sh")
t0=$SECONDS
# helm installs crds/ with the first install only and never upgrades them (docs/helm.md): a cluster that is
# reused gets the CRDs of this tree (a changed schema, a new kind) the way docs/helm.md tells users to.
kubectl apply --server-side --force-conflicts -f "$REPO_ROOT/crds/" >/dev/null
"$helm" upgrade --install blazen-operator "$REPO_ROOT/helm/blazen-operator" \
  --namespace "$OP_NS" --create-namespace \
  --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}" --set image.pullPolicy=Never \
  --set-string "podAnnotations.blazen-fleet/image-id=$(docker image inspect -f '{{.Id}}' "$OPERATOR_IMAGE" | cut -c8-19)" \
  --wait --timeout 5m
record_time operator-install $((SECONDS - t0))
