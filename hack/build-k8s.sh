#!/usr/bin/env bash
# Builds Kubernetes binaries from the Go module proxy through a wrapper module: k8s.io/kubernetes requires its
# staging modules at v0.0.0 and maps them with replace directives that a consumer never sees, so the wrapper
# repeats those replaces with the published v0.MINOR.PATCH versions.
# Usage: hack/build-k8s.sh [binary ...]   (default: all seven)
source "$(dirname "$0")/lib.sh"

all=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubeadm kubelet kubectl)
wanted=("${@:-${all[@]}}")
out="$CACHE_ROOT/k8s-$K8S_VERSION/bin"
src="$CACHE_ROOT/k8s-$K8S_VERSION/src"
mkdir -p "$out" "$src"

missing=()
for b in "${wanted[@]}"; do [[ -x "$out/$b" ]] || missing+=("$b"); done
if ((${#missing[@]} == 0)); then log "k8s $K8S_VERSION: ${wanted[*]} cached"; exit 0; fi

if [[ ! -f "$src/go.mod" ]]; then
  log "k8s $K8S_VERSION: writing wrapper module"
  upstream_mod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  staging_version="v0.${K8S_VERSION#v1.}"
  {
    echo "module blazen-fleet/k8s-wrapper"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^\t\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"$staging_version"'#p' "$upstream_mod"
    echo ")"
  } > "$src/go.mod.tmp"
  mv "$src/go.mod.tmp" "$src/go.mod"
  printf 'package wrapper\n' > "$src/doc.go"
fi

major_minor=${K8S_VERSION#v}; major=${major_minor%%.*}; minor=${major_minor#*.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit=0000000000000000000000000000000000000000"
  ldflags+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

cd "$src"
for b in "${missing[@]}"; do
  log "k8s $K8S_VERSION: building $b"
  start=$SECONDS
  go build -trimpath -ldflags "$ldflags" -o "$out/$b.tmp" "k8s.io/kubernetes/cmd/$b"
  mv "$out/$b.tmp" "$out/$b"
  log "k8s $K8S_VERSION: $b built in $((SECONDS - start)) s"
done
