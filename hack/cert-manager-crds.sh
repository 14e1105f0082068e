#!/usr/bin/env bash
# Writes cert-manager's CRDs as one plain YAML file, from the Go module cache (no registry, no GitHub):
#   $CACHE_ROOT/cert-manager-$CERT_MANAGER_VERSION/crds.yaml
# The module's deploy/crds/crd-*.yaml are Helm-templated snippets; the only template lines are the metadata
# labels, which are rendered to static values here. Prints the output path. Standalone: needs go and lib.sh only.
source "$(dirname "$0")/lib.sh"

CERT_MANAGER_VERSION="${CERT_MANAGER_VERSION:-v1.11.5}"
out="$CACHE_ROOT/cert-manager-$CERT_MANAGER_VERSION/crds.yaml"
if [[ -s "$out" ]]; then echo "$out"; exit 0; fi
mkdir -p "$(dirname "$out")"

dir=$(cd /tmp && go mod download -json "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION" \
  | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
[[ -d "$dir/deploy/crds" ]] || { log "cert-manager $CERT_MANAGER_VERSION: no deploy/crds in $dir"; exit 1; }

tmp="$out.tmp"
: > "$tmp"
for f in certificaterequests certificates challenges clusterissuers issuers orders; do
  src="$dir/deploy/crds/crd-$f.yaml"
  {
    echo "---"
    # Render the Helm bits: name/instance labels become static, the "Generated labels" include is dropped.
    sed -e "s/'{{ template \"cert-manager.name\" . }}'/cert-manager/" \
        -e "s/'{{ .Release.Name }}'/cert-manager/" \
        -e '/{{-* *include /d' \
        "$src"
    echo
  } >> "$tmp"
done
if grep -n '{{' "$tmp" >&2; then log "cert-manager CRDs: unrendered template lines above"; exit 1; fi
mv "$tmp" "$out"
log "cert-manager $CERT_MANAGER_VERSION CRDs: $out"
echo "$out"
