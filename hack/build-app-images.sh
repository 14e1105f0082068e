#!/usr/bin/env bash
# Builds our own images locally, with no pulls:
#   blazen-fleet/peer-runtime:dev    python3 + blazen-fleet[peer]       entrypoint blazen-peer      images/python-app
#   blazen-fleet/operator:dev        python3 + blazen-fleet[operator]   entrypoint blazen-operator  images/python-app
#   blazen-fleet/example-steps:dev   peer-runtime + examples/steps (blazen_examples)             images/example-steps
# Base: the bookworm python rootfs (hack/build-rootfs.sh python). The project's wheel and every dependency are
# built/downloaded on the host with pip (PyPI) into the build context and installed with --no-index, so the
# `docker build` itself needs no network. Each image also gets a tag src-<hash of its inputs>; an image whose
# inputs did not change is not rebuilt. Saved under ~/.cache/blazen-fleet/images too.
# Usage: hack/build-app-images.sh [peer-runtime operator example-steps]
source "$(dirname "$0")/kind-lib.sh"
PIP="${PIP:-$REPO_ROOT/.venv/bin/pip}"
[[ -x "$PIP" ]] || PIP="python3 -m pip"
APP_TAG="${APP_TAG:-dev}"

src_hash() { # extra files...
  (cd "$REPO_ROOT" && { git ls-files -co --exclude-standard pyproject.toml peer_runtime operator "$@" | grep -v '/tests/' |
    sort | xargs sha256sum; cat "$HACK_DIR/build-rootfs.sh"; } | sha256sum | cut -c1-12)
}

build_app() { # name recipe extras entry extra-src...  (recipe: the images/ directory with the Dockerfile)
  local name="$1" recipe="$2" extras="$3" entry="$4"; shift 4
  local hash; hash=$(src_hash "images/$recipe" "$@")
  local ref="blazen-fleet/$name:$APP_TAG" key="blazen-fleet/$name:src-$hash"
  if ! docker_image_exists "$key" && [[ -f "$IMAGES_DIR/app-$name-$hash.tar" ]]; then
    docker load -i "$IMAGES_DIR/app-$name-$hash.tar" >/dev/null
  fi
  if docker_image_exists "$key"; then docker tag "$key" "$ref"; log "$ref up to date ($key)"; return 0; fi
  "$HACK_DIR/build-rootfs.sh" python
  local ctx; ctx=$(mktemp -d)
  mkdir "$ctx/wheels"
  local target="${REPO_ROOT}[$extras]" deps=() plog="$LOG_DIR/pip-wheel-$name.log"
  # The project's wheel plus its dependencies' wheels (binary wheels from PyPI; pip's cache makes reruns fast).
  [[ "$name" == example-steps ]] && { target="$REPO_ROOT/examples/steps"; deps=(--no-deps); }
  if ! $PIP wheel --quiet "${deps[@]}" --wheel-dir "$ctx/wheels" "$target" >"$plog" 2>&1; then
    tail -30 "$plog" >&2; log "error: pip wheel $target failed (log: $plog)"; return 1
  fi
  cp "$REPO_ROOT/images/$recipe/Dockerfile" "$ctx/"
  local build_args=()
  [[ -z "$entry" ]] || build_args=(--build-arg "EXTRA=$extras" --build-arg "ENTRY=$entry")
  docker build -q "${build_args[@]}" -t "$ref" -t "$key" "$ctx" >/dev/null
  rm -rf "$ctx"
  image_to_cache "app-$name-$hash" "$key"
  log "$ref built ($key)"
}

for n in "${@:-peer-runtime operator example-steps}"; do
  for nn in $n; do
    case "$nn" in
      peer-runtime) timed image-peer-runtime build_app peer-runtime python-app peer blazen-peer ;;
      operator) timed image-operator build_app operator python-app operator blazen-operator ;;
      # Its inputs include the runtime's, so a runtime change rebuilds it too.
      example-steps) timed image-example-steps build_app example-steps example-steps "" "" examples/steps images/python-app ;;
    esac
  done
done
