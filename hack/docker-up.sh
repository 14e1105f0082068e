#!/usr/bin/env bash
# Makes a Docker Engine available that can run kind's privileged node containers:
#  * installs Debian's docker.io when no dockerd exists, starts dockerd when none answers;
#  * when CAP_SYS_RESOURCE (capability 24) is missing from this host's capability bounding set, installs
#    hack/files/runc-drop-sys-resource and registers it as Docker's default runtime (daemon.json + SIGHUP,
#    which reloads runtimes live), because `docker run --privileged` fails otherwise;
#  * raises the inotify limits kind needs for several nodes.
# Harmless when a suitable Docker already runs.
source "$(dirname "$0")/kind-lib.sh"

WRAPPER=/usr/local/libexec/blazen-fleet/runc-drop-sys-resource
RUNTIME_NAME=runc-nosysresource
DAEMON_JSON=/etc/docker/daemon.json

ensure_apt jq iptables ca-certificates

sysctl -qw fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=512 2>/dev/null ||
  log "warning: could not raise inotify limits (kind multi-node clusters may hit 'too many open files')"

cap_missing() {
  local bnd; bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
  (( (0x$bnd >> 24 & 1) == 0 ))
}

if ! command -v dockerd >/dev/null; then
  ensure_apt docker.io
fi

need_wrapper=false
if cap_missing; then
  need_wrapper=true
  log "CAP_SYS_RESOURCE is missing from the bounding set: installing the OCI runtime wrapper"
  install -D -m 0755 "$HACK_DIR/files/runc-drop-sys-resource" "$WRAPPER"
  real_runc=$(command -v runc || true)
  [[ -n "$real_runc" ]] || { ensure_apt runc; real_runc=$(command -v runc); }
  [[ "$real_runc" == /usr/sbin/runc ]] || sed -i "s#:-/usr/sbin/runc#:-$real_runc#" "$WRAPPER"
  mkdir -p /etc/docker
  [[ -s "$DAEMON_JSON" ]] || echo '{}' > "$DAEMON_JSON"
  jq --arg n "$RUNTIME_NAME" --arg p "$WRAPPER" \
    '.runtimes[$n] = {path: $p} | ."default-runtime" = $n' "$DAEMON_JSON" > "$DAEMON_JSON.tmp"
  mv "$DAEMON_JSON.tmp" "$DAEMON_JSON"
fi

dockerd_pid() { pgrep -x dockerd | head -1; }

if docker info >/dev/null 2>&1; then
  if $need_wrapper && [[ "$(docker info --format '{{.DefaultRuntime}}')" != "$RUNTIME_NAME" ]]; then
    pid=$(dockerd_pid)
    [[ -n "$pid" ]] || { log "error: Docker answers but no local dockerd to reconfigure"; exit 1; }
    log "reloading dockerd ($pid) to pick up the default runtime"
    kill -HUP "$pid"
    for _ in $(seq 20); do
      [[ "$(docker info --format '{{.DefaultRuntime}}')" == "$RUNTIME_NAME" ]] && break
      sleep 0.5
    done
  fi
else
  if [[ -n "$(dockerd_pid)" ]]; then
    log "dockerd runs but does not answer yet; waiting"
  elif [[ -d /run/systemd/system ]] && systemctl cat docker.service >/dev/null 2>&1; then
    log "starting docker.service"
    systemctl start docker
  else
    log "starting dockerd (log: $LOG_DIR/dockerd.log)"
    nohup dockerd >>"$LOG_DIR/dockerd.log" 2>&1 </dev/null &
    disown || true
  fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { log "error: dockerd did not come up; see $LOG_DIR/dockerd.log"; exit 1; }
fi

if $need_wrapper; then
  rt=$(docker info --format '{{.DefaultRuntime}}')
  [[ "$rt" == "$RUNTIME_NAME" ]] || { log "error: default runtime is $rt, not $RUNTIME_NAME"; exit 1; }
fi
log "docker: $(docker version --format '{{.Server.Version}}') up, default runtime $(docker info --format '{{.DefaultRuntime}}')"
