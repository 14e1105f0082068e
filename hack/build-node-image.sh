#!/usr/bin/env bash
# Assembles the kind node image offline, the way kind v0.30.0's own code does it (kind build node-image cannot:
# it always fetches etcd/coredns/pause/kindnetd from a registry):
#  1. base: our bookworm rootfs + kind's images/base/files (from the kind module in GOMODCACHE) + the same
#     systemd cleanup/enable/mask steps as kind's Dockerfile + containerd/runc/crictl/CNI plugins we built;
#  2. node: `docker run --entrypoint=sleep base infinity`, copy kubeadm/kubelet/kubectl to /usr/bin, write
#     /kind/version and /kind/manifests/default-cni.yaml, start containerd, `ctr images import --no-unpack` the
#     component tarball, stop containerd, `docker commit --change ENTRYPOINT`.
# The result is $NODE_IMAGE, also saved to ~/.cache/blazen-fleet/images.
source "$(dirname "$0")/kind-lib.sh"
source "$HACK_DIR/kind-versions.sh"
source "$HACK_DIR/kind-images.sh"

kind_files="$GOMODCACHE/sigs.k8s.io/kind@$KIND_VERSION/images/base/files"
[[ -d "$kind_files" ]] || (cd /tmp && go mod download "sigs.k8s.io/kind@$KIND_VERSION")

bits_sum=$( { echo "$K8S_VERSION $CONTAINERD_VERSION $RUNC_VERSION $CRICTL_VERSION $CNI_PLUGINS_VERSION $KIND_VERSION"
  echo "$COMPONENT_TAR"; sha256sum "$0"; } | sha256sum | cut -c1-10)
NODE_TAR="node-$K8S_VERSION-$bits_sum"
BASE_IMAGE="blazen-fleet/kind-node-base:$K8S_VERSION-$bits_sum"

node_current() { docker image inspect -f '{{index .Config.Labels "blazen-fleet.node-bits"}}' "$NODE_IMAGE" 2>/dev/null | grep -qx "$bits_sum"; }

if node_current; then log "$NODE_IMAGE cached"; exit 0; fi
if [[ -f "$IMAGES_DIR/$NODE_TAR.tar" ]]; then
  docker load -i "$IMAGES_DIR/$NODE_TAR.tar" >/dev/null
  if node_current; then log "$NODE_IMAGE loaded from $NODE_TAR.tar"; exit 0; fi
fi

"$HACK_DIR/build-rootfs.sh" node
"$HACK_DIR/build-images.sh" components

build_base() {
  local ctx; ctx=$(mktemp -d)
  cp -r "$kind_files" "$ctx/files"; chmod -R u+w "$ctx/files"
  mkdir -p "$ctx/bin" "$ctx/cni"
  cp "$NODE_BITS/containerd-$CONTAINERD_VERSION/"{containerd,ctr,containerd-shim-runc-v2} "$ctx/bin/"
  cp "$NODE_BITS/runc-$RUNC_VERSION/runc" "$ctx/bin/"
  cp "$NODE_BITS/crictl-$CRICTL_VERSION/crictl" "$ctx/bin/"
  cp "$NODE_BITS/cni-$CNI_PLUGINS_VERSION/"* "$ctx/cni/"
  cat > "$ctx/Dockerfile" <<DOCKERFILE
FROM blazen-fleet/kind-base-rootfs:$DEBIAN_SUITE
COPY files/usr/local/bin/ /usr/local/bin/
COPY files/kind/ /kind/
COPY files/LICENSES/ /LICENSES/
COPY files/etc/ /etc/
# restrict_oom_score_adj = true (kind sets it only for rootless): without CAP_SYS_RESOURCE (see
# hack/docker-up.sh) no process in the node may lower an oom_score_adj, and runc fails every pod sandbox
# (oomScoreAdj -998) with "can't get final child's PID from pipe: EOF". With it, containerd clamps the
# requested value to its own.
RUN chmod 0755 /usr/local/bin/* /kind/bin /kind/bin/* \\
    && find /etc/containerd /etc/default /etc/sysctl.d /etc/systemd/system /etc/crictl.yaml -type f -exec chmod 0644 {} + \\
    && find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete \\
    && rm -f /lib/systemd/system/multi-user.target.wants/* \\
    && rm -f /etc/systemd/system/*.wants/* \\
    && rm -f /lib/systemd/system/local-fs.target.wants/* \\
    && rm -f /lib/systemd/system/sockets.target.wants/*udev* \\
    && rm -f /lib/systemd/system/sockets.target.wants/*initctl* \\
    && rm -f /lib/systemd/system/basic.target.wants/* \\
    && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \\
    && ln -sf "\$(command -v systemd || echo /lib/systemd/systemd)" /sbin/init
RUN systemctl enable kubelet.service \\
    && systemctl enable containerd.service \\
    && systemctl enable undo-mount-hacks.service \\
    && systemctl mask systemd-binfmt.service \\
    && mkdir -p /etc/kubernetes/manifests
COPY bin/containerd bin/ctr bin/containerd-shim-runc-v2 bin/crictl /usr/local/bin/
COPY bin/runc /usr/local/sbin/runc
COPY cni/ /opt/cni/bin/
RUN ctr oci spec \\
      | jq '.hooks.createContainer[.hooks.createContainer| length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \\
      | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json \\
    && sed -i 's#sandbox_image = .*#sandbox_image = "$PAUSE_IMAGE"#' /etc/containerd/config.toml \\
    && sed -i 's#restrict_oom_score_adj = false#restrict_oom_score_adj = true#' /etc/containerd/config.toml \\
    && containerd --version && runc --version
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]
DOCKERFILE
  docker build -q -t "$BASE_IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
}

assemble_node() {
  local id="blazen-node-build-$$" k8s_bin="$CACHE_ROOT/k8s-$K8S_VERSION/bin"
  docker rm -f "$id" >/dev/null 2>&1 || true
  trap 'docker rm -f '"$id"' >/dev/null 2>&1 || true' RETURN
  docker run -d --name "$id" --privileged --security-opt seccomp=unconfined --entrypoint=sleep "$BASE_IMAGE" infinity >/dev/null
  for b in kubeadm kubelet kubectl; do docker cp "$k8s_bin/$b" "$id:/usr/bin/$b"; done
  echo "$K8S_VERSION" | docker exec -i "$id" cp /dev/stdin /kind/version
  docker exec "$id" mkdir -p /kind/manifests
  sed "s#image: KINDNET_IMAGE#image: $KINDNET_IMAGE#" "$REPO_ROOT/images/kindnet-lite/manifest.yaml" |
    docker exec -i "$id" cp /dev/stdin /kind/manifests/default-cni.yaml
  docker exec "$id" bash -c 'nohup containerd > /tmp/containerd.log 2>&1 &
    for i in $(seq 30); do [ -S /run/containerd/containerd.sock ] && ctr info >/dev/null 2>&1 && break; sleep 1; done
    ctr info >/dev/null'
  docker exec -i "$id" ctr --namespace=k8s.io images import --label=io.cri-containerd.pinned=pinned \
    --all-platforms --no-unpack --digests - < "$IMAGES_DIR/$COMPONENT_TAR.tar" >/dev/null
  docker exec "$id" ctr --namespace=k8s.io images ls -q | sort > "$LOG_DIR/node-images.txt"
  local want missing=0
  for want in "${COMPONENT_IMAGES[@]}"; do
    grep -qx "$want" "$LOG_DIR/node-images.txt" || { log "error: $want missing in the node's containerd"; missing=1; }
  done
  docker exec "$id" bash -c 'pkill containerd; for i in $(seq 20); do pgrep -x containerd >/dev/null || break; sleep 0.5; done; rm -rf /tmp/*'
  ((missing == 0)) || return 1
  docker commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' --change 'CMD []' \
    --change "LABEL blazen-fleet.node-bits=$bits_sum" "$id" "$NODE_IMAGE" >/dev/null
}

timed node-base build_base
timed node-assemble assemble_node
timed node-save image_to_cache "$NODE_TAR" "$NODE_IMAGE"
docker rmi "$BASE_IMAGE" >/dev/null 2>&1 || true
log "node image $NODE_IMAGE ready"
