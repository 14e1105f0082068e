#!/usr/bin/env bash
# Builds helm v3 from the Go module proxy with the ldflags helm's own Makefile sets, so `helm version` reports the
# release and `helm template`/`helm lint` assume the Kubernetes minor this project runs (K8S_VERSION), not helm's
# compiled-in default of 1.20. Cached under $CACHE_ROOT/helm-$HELM_VERSION/bin/helm; a rerun does nothing.
# Prints the binary's path on stdout.
# Usage: hack/build-helm.sh
source "$(dirname "$0")/lib.sh"

out="$CACHE_ROOT/helm-$HELM_VERSION/bin"
if [[ -x "$out/helm" ]]; then
  log "helm $HELM_VERSION cached"
  echo "$out/helm"
  exit 0
fi
mkdir -p "$out"

# helm's Makefile derives these from its client-go; we pin them to the cluster this project targets instead.
k8s=${K8S_VERSION#v}; k8s_major=${k8s%%.*}; k8s_minor=${k8s#*.}; k8s_minor=${k8s_minor%%.*}

# Same variables as helm's Makefile (internal/version, pkg/chartutil, pkg/lint/rules). A module-proxy build has
# no git checkout: the commit is left empty, the tree is clean, and the metadata is empty as for a tagged build.
v=helm.sh/helm/v3
ldflags="-w -s"
ldflags+=" -X $v/internal/version.version=$HELM_VERSION"
ldflags+=" -X $v/internal/version.metadata="
ldflags+=" -X $v/internal/version.gitCommit="
ldflags+=" -X $v/internal/version.gitTreeState=clean"
ldflags+=" -X $v/pkg/lint/rules.k8sVersionMajor=$k8s_major -X $v/pkg/lint/rules.k8sVersionMinor=$k8s_minor"
ldflags+=" -X $v/pkg/chartutil.k8sVersionMajor=$k8s_major -X $v/pkg/chartutil.k8sVersionMinor=$k8s_minor"

tmp=$(mktemp -d "$out/.gobin.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log "helm $HELM_VERSION: building (Kubernetes $k8s_major.$k8s_minor assumed)"
start=$SECONDS
# `go install pkg@version` builds outside any main module; -mod=mod from lib.sh does not apply to it.
GOFLAGS="-buildvcs=false" GOBIN="$tmp" go install -trimpath -ldflags "$ldflags" "$v/cmd/helm@$HELM_VERSION"
mv "$tmp/helm" "$out/helm"
log "helm $HELM_VERSION: built in $((SECONDS - start)) s"
echo "$out/helm"
