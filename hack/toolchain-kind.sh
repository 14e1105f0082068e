#!/usr/bin/env bash
# Everything the kind cluster needs, without creating it: Docker (+ capability wrapper), the Go toolchain
# (serial build queue), the Debian rootfs images (built beside the Go builds: network/disk-bound vs CPU-bound),
# the node image and the component + cert-manager images. Cached; a warm rerun takes seconds.
source "$(dirname "$0")/kind-lib.sh"

"$HACK_DIR/docker-up.sh"
"$HACK_DIR/build-rootfs.sh" > "$LOG_DIR/rootfs-background.log" 2>&1 &
rootfs_pid=$!
"$HACK_DIR/build-toolchain.sh"
if ! wait "$rootfs_pid"; then cat "$LOG_DIR/rootfs-background.log" >&2; log "error: rootfs build failed"; exit 1; fi
"$HACK_DIR/build-node-image.sh"
"$HACK_DIR/build-images.sh" components cert-manager
