#!/usr/bin/env bash
# `make demo`: one command on a fresh machine. Builds or reuses the toolchain, brings up the kind cluster with
# cert-manager (hack/kind-up.sh), builds our images and loads them into the nodes, installs the operator with
# its Helm chart, applies examples/ (a CPU and a GPU BlazenPeer), waits for Ready with visible progress, and
# invokes a CPU and a GPU sub-workflow through each BlazenPeer's Service over mTLS (kubectl port-forward +
# examples/client.py with the client certificate the operator issued), printing where each ran. Then the same
# steps as one BlazenFleet (examples/fleet.yaml, namespace blazen-fleet): every call through its one router
# Service, a CPU -> GPU -> CPU request split over the pools, and calls on one connection spread per call.
source "$(dirname "$0")/kind-lib.sh"
export KUBECONFIG="${KUBECONFIG:-$CACHE_ROOT/kind-$CLUSTER_NAME.kubeconfig}"
NS="${DEMO_NAMESPACE:-blazen-demo}"
OP_NS="${OPERATOR_NAMESPACE:-blazen-system}"
PY="${PY:-$REPO_ROOT/.venv/bin/python}"
t0=$SECONDS

step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

# Port-forwards and client-certificate copies outlive a failed step unless the exit removes them: with
# `set -e` a failing client would otherwise leave a kubectl process and a private key behind.
cleanup_pids=() cleanup_dirs=()
cleanup() {
  local pid
  for pid in "${cleanup_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  ((${#cleanup_dirs[@]} == 0)) || rm -rf -- "${cleanup_dirs[@]}"
}
trap cleanup EXIT

step "cluster (toolchain, node image, 3 nodes, cert-manager)"
"$HACK_DIR/kind-up.sh"

step "operator: our images + helm/blazen-operator"
"$HACK_DIR/deploy-operator.sh"
kubectl -n "$OP_NS" get pods -o wide

step "examples: a CPU and a GPU BlazenPeer in namespace $NS"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$NS" apply -f "$REPO_ROOT/examples/cpu-peer.yaml" -f "$REPO_ROOT/examples/gpu-peer.yaml"

wait_ready() { # name
  local name="$1" deadline=$((SECONDS + ${DEMO_READY_TIMEOUT:-300})) phase msg
  while ((SECONDS < deadline)); do
    phase=$(kubectl -n "$NS" get blazenpeer "$name" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    msg=$(kubectl -n "$NS" get blazenpeer "$name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}' 2>/dev/null || true)
    printf '  %-14s %-12s %s\n' "$name" "${phase:-?}" "$msg" >&2
    [[ "$phase" == Ready ]] && return 0
    sleep 5
  done
  kubectl -n "$NS" describe blazenpeer "$name" >&2; kubectl -n "$NS" get pods -o wide >&2
  log "error: $name not Ready"; return 1
}
wait_ready examples-cpu
wait_ready examples-gpu
kubectl -n "$NS" get blazenpeers
kubectl -n "$NS" get pods -o wide

invoke() { # name port input step...
  local name="$1" input="$3"; shift 3
  local steps=(); local s; for s in "$@"; do steps+=(--step "$s"); done
  local dir; dir=$(mktemp -d)
  cleanup_dirs+=("$dir")
  local secret; secret=$(kubectl -n "$NS" get blazenpeer "$name" -o jsonpath='{.status.certificate.clientSecretName}')
  for k in tls.crt tls.key ca.crt; do
    kubectl -n "$NS" get secret "$secret" -o jsonpath="{.data.${k//./\\.}}" | base64 -d > "$dir/$k"
  done
  local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  kubectl -n "$NS" port-forward "svc/$name" "$port:50051" >"$dir/pf.log" 2>&1 &
  cleanup_pids+=($!)
  for _ in $(seq 50); do grep -q Forwarding "$dir/pf.log" && break; sleep 0.2; done
  "$PY" "$REPO_ROOT/examples/client.py" "127.0.0.1:$port" --cert "$dir/tls.crt" --key "$dir/tls.key" \
    --ca "$dir/ca.crt" --server-name "$name.$NS.svc" "${steps[@]}" --input "$input"
}

pods_where() { # name -> "pod node pool" lines
  kubectl -n "$NS" get pods -l "app.kubernetes.io/instance=$1" \
    -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.nodeName}{"\n"}{end}' |
  while read -r pod node; do
    printf '    %s on node %s (pool %s)\n' "$pod" "$node" \
      "$(kubectl get node "$node" -o jsonpath='{.metadata.labels.blazen\.dev/pool}')"
  done
}

step "CPU sub-workflow over mTLS: examples::tokenize -> examples::count (Service examples-cpu)"
invoke examples-cpu 50051 '{"text": "to be or not to be"}' examples::tokenize examples::count
echo "  served by the examples-cpu fleet:"; pods_where examples-cpu

step "GPU sub-workflow over mTLS: examples::gpu_info (Service examples-gpu)"
invoke examples-gpu 50051 '{}' examples::gpu_info
echo "  served by the examples-gpu fleet:"; pods_where examples-gpu

FLEET_NS="${DEMO_FLEET_NAMESPACE:-blazen-fleet}"
step "a fleet: examples/fleet.yaml (a CPU and a GPU pool behind one router) in namespace $FLEET_NS"
kubectl create namespace "$FLEET_NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$FLEET_NS" apply -f "$REPO_ROOT/examples/fleet.yaml"
deadline=$((SECONDS + ${DEMO_READY_TIMEOUT:-300}))
while :; do
  phase=$(kubectl -n "$FLEET_NS" get blazenfleet examples -o jsonpath='{.status.phase}' 2>/dev/null || true)
  msg=$(kubectl -n "$FLEET_NS" get blazenfleet examples -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}' 2>/dev/null || true)
  printf '  %-14s %-12s %s\n' examples "${phase:-?}" "$msg" >&2
  [[ "$phase" == Ready ]] && break
  if ((SECONDS > deadline)); then
    kubectl -n "$FLEET_NS" describe blazenfleet examples >&2; kubectl -n "$FLEET_NS" get pods -o wide >&2
    log "error: the fleet is not Ready"; exit 1
  fi
  sleep 5
done
kubectl -n "$FLEET_NS" get blazenfleets,blazenpeers
kubectl -n "$FLEET_NS" get pods -o wide

# Every call below goes to the ONE router Service; the caller's identity is the fleet's client certificate
# (<fleet>-client-tls, of the namespace CA the router trusts) and the CA certificate that Secret carries.
fleet_dir=$(mktemp -d)
cleanup_dirs+=("$fleet_dir")
fleet_secret=$(kubectl -n "$FLEET_NS" get blazenfleet examples -o jsonpath='{.status.certificate.clientSecretName}')
for _ in $(seq 60); do
  [ -n "$(kubectl -n "$FLEET_NS" get secret "$fleet_secret" -o jsonpath='{.data.tls\.crt}')" ] && break
  sleep 2
done
for k in tls.crt tls.key ca.crt; do
  kubectl -n "$FLEET_NS" get secret "$fleet_secret" -o jsonpath="{.data.${k//./\\.}}" | base64 -d > "$fleet_dir/$k"
done
fleet_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
kubectl -n "$FLEET_NS" port-forward svc/examples "$fleet_port:50051" >"$fleet_dir/pf.log" 2>&1 &
cleanup_pids+=($!)
for _ in $(seq 50); do grep -q Forwarding "$fleet_dir/pf.log" && break; sleep 0.2; done
via_router() { # args for examples/client.py
  "$PY" "$REPO_ROOT/examples/client.py" "127.0.0.1:$fleet_port" --cert "$fleet_dir/tls.crt" \
    --key "$fleet_dir/tls.key" --ca "$fleet_dir/ca.crt" --server-name "examples.$FLEET_NS.svc" "$@"
}

step "through the router: the CPU chain examples::tokenize -> examples::count (pool cpu)"
via_router --step examples::tokenize --step examples::count --input '{"text": "to be or not to be"}'

step "through the router: examples::gpu_info (pool gpu, the GPU node)"
via_router --step examples::gpu_info --input '{}'

step "through the router: ONE request, three steps on two pools: extract (CPU) -> embed (GPU) -> index (CPU)"
via_router --step examples::extract --step examples::embed --step examples::index \
  --input '{"text": "route GPU steps to labelled node pools"}' |
  "$PY" -c 'import json, sys; out = json.load(sys.stdin); print("  result:", json.dumps(out["result"]))
for h in out["state"]["hops"]: print("  %-20s ran on pod %s, node %s (pool %s)" % (h["step"], h["pod"], h["node"], h["pool"]))'

step "through the router: 20 calls on one connection, balanced per call over the CPU pool's replicas"
via_router --workflow where --repeat 20 |
  "$PY" -c 'import collections, json, sys
c = collections.Counter((o["result"]["pod"], o["result"]["node"]) for o in map(json.loads, sys.stdin))
for (pod, node), n in sorted(c.items()): print(f"  {n:3d} calls served by {pod} on node {node}")'

record_time demo-total $((SECONDS - t0))
step "demo done in $((SECONDS - t0)) s.  export KUBECONFIG=$KUBECONFIG   (make demo-down removes it all)"
