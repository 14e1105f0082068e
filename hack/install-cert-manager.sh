#!/usr/bin/env bash
# Installs cert-manager into the kind cluster from its own Helm chart, rendered offline from the Go module cache
# with our helm (CRDs included, startupapicheck off, images = the local tags hack/build-images.sh built,
# imagePullPolicy Never), then proves the webhook and the CA issuer path work with a throwaway Certificate.
# Usage: hack/install-cert-manager.sh [--render-only]   (prints the manifest path with --render-only)
source "$(dirname "$0")/kind-lib.sh"
export KUBECONFIG="${KUBECONFIG:-$CACHE_ROOT/kind-$CLUSTER_NAME.kubeconfig}"

chart_src="$GOMODCACHE/github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION/deploy"
[[ -d "$chart_src" ]] || (cd /tmp && go mod download "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION")
rendered="$CACHE_ROOT/cert-manager-$CERT_MANAGER_VERSION/cert-manager.yaml"

render() {
  local helm; helm=$("$HACK_DIR/build-helm.sh")
  local work; work=$(mktemp -d)
  cp -r "$chart_src/charts/cert-manager" "$work/chart"; chmod -R u+w "$work/chart"
  sed -e "s/^version: .*/version: $CERT_MANAGER_VERSION/" -e "s/^appVersion: .*/appVersion: $CERT_MANAGER_VERSION/" \
    -e 's/"{{IS_PRERELEASE}}"/"false"/' "$work/chart/Chart.template.yaml" > "$work/chart/Chart.yaml"
  rm "$work/chart/Chart.template.yaml"
  # What upstream's make/manifests.mk does: the CRDs become one template gated by installCRDs.
  { echo '{{- if .Values.installCRDs }}'
    for f in "$chart_src"/crds/crd-*.yaml; do echo '---'; cat "$f"; done
    echo '{{- end }}'; } > "$work/chart/templates/crds.yaml"
  mkdir -p "$(dirname "$rendered")"
  "$helm" template cert-manager "$work/chart" --namespace cert-manager --kube-version 1.34.0 \
    --set installCRDs=true --set startupapicheck.enabled=false \
    --set image.tag="$CERT_MANAGER_VERSION" --set image.pullPolicy=Never \
    --set webhook.image.tag="$CERT_MANAGER_VERSION" --set webhook.image.pullPolicy=Never \
    --set cainjector.image.tag="$CERT_MANAGER_VERSION" --set cainjector.image.pullPolicy=Never \
    > "$rendered.tmp"
  { printf 'apiVersion: v1\nkind: Namespace\nmetadata:\n  name: cert-manager\n---\n'; cat "$rendered.tmp"; } > "$rendered"
  rm -rf "$work" "$rendered.tmp"
}

[[ -s "$rendered" && "$rendered" -nt "$0" ]] || timed cert-manager-render render
if [[ "${1:-}" == --render-only ]]; then echo "$rendered"; exit 0; fi

log "cert-manager: applying $rendered"
kubectl apply --server-side --force-conflicts -f "$rendered" >/dev/null
for d in cert-manager cert-manager-cainjector cert-manager-webhook; do
  kubectl -n cert-manager rollout status "deploy/$d" --timeout=180s
done

# The webhook answers only once it has its serving certificate and the cainjector patched the CA bundles;
# a throwaway self-signed Issuer and Certificate prove the whole path.
log "cert-manager: smoke test (self-signed Issuer + Certificate)"
smoke=$(cat <<'YAML'
apiVersion: v1
kind: Namespace
metadata: {name: cert-manager-smoke}
---
apiVersion: cert-manager.io/v1
kind: Issuer
metadata: {name: selfsigned, namespace: cert-manager-smoke}
spec: {selfSigned: {}}
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {name: smoke, namespace: cert-manager-smoke}
spec:
  secretName: smoke-tls
  commonName: smoke.example
  dnsNames: [smoke.example]
  issuerRef: {name: selfsigned, kind: Issuer}
YAML
)
for i in $(seq 60); do
  if kubectl apply -f - <<<"$smoke" >/dev/null 2>&1; then break; fi
  ((i % 10 == 0)) && log "cert-manager: webhook not answering yet"
  sleep 2
done
kubectl -n cert-manager-smoke wait certificate/smoke --for=condition=Ready --timeout=120s
kubectl delete namespace cert-manager-smoke --wait=false >/dev/null
log "cert-manager $CERT_MANAGER_VERSION ready"
